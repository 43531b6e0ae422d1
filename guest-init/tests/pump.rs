//! The run after `READY` ([`pump::run_command`], [`pump::report_exit`]) with
//! real commands, a socket pair standing in for the virtio port and a
//! SOCK_SEQPACKET pair for `/dev/kmsg`.
//!
//! Its own harness (`harness = false`): like the init, it blocks SIGCHLD
//! before any thread starts, so that the signalfd sees every SIGCHLD, and it
//! reaps every child. It also becomes a child subreaper, so that orphans come
//! to it as they come to PID 1. Arguments: substrings of the tests to run.

use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use minivmm_guest_init::kmsg::{Kmsg, KEPT};
use minivmm_guest_init::port::Port;
use minivmm_guest_init::pump;
use minivmm_guest_init::reaper::Reaper;
use run_protocol::{
    frame, frames, Deframer, Exit, EXIT, KMSG, MAX_PAYLOAD, STARTED, STDERR, STDIN, STDIN_EOF,
    STDOUT,
};

type Frames = Vec<(u8, Vec<u8>)>;
type Test = fn(&Reaper);

/// What the host saw of one run.
struct Run {
    frames: Frames,
    elapsed: Duration,
}

impl Run {
    fn payloads(&self, kind: u8) -> Vec<u8> {
        self.frames
            .iter()
            .filter(|(k, _)| *k == kind)
            .flat_map(|(_, p)| p.clone())
            .collect()
    }

    fn exit(&self) -> Exit {
        let (kind, payload) = self.frames.last().expect("no frames");
        assert_eq!(*kind, EXIT, "the last frame");
        Exit::decode(payload).expect("a bad EXIT")
    }

    /// The kinds of the frames, without the output and the kernel log.
    fn events(&self) -> Vec<u8> {
        self.frames
            .iter()
            .map(|(k, _)| *k)
            .filter(|k| ![STDOUT, STDERR, KMSG].contains(k))
            .collect()
    }
}

/// Runs `argv` as the init would, the host sending `to_guest` (raw frames)
/// and reading every frame until `EXIT`.
fn run(reaper: &Reaper, argv: &[&str], to_guest: Vec<u8>, kmsg: Option<&mut Kmsg>) -> Run {
    let (guest, host) = UnixStream::pair().expect("socketpair");
    let host_w = host.try_clone().expect("dup");
    let writer = std::thread::spawn(move || {
        // The guest may stop reading once the command ended: that is fine.
        let _ = (&host_w).write_all(&to_guest);
    });
    let reader = std::thread::spawn(move || {
        let mut d = Deframer::default();
        let mut got = Frames::new();
        let mut buf = vec![0; 1 << 16];
        loop {
            let n = (&host).read(&mut buf).expect("read the channel");
            if n == 0 {
                return got;
            }
            d.feed(&buf[..n]);
            while let Some(f) = d.next_frame().expect("a bad frame") {
                let last = f.0 == EXIT;
                got.push(f);
                if last {
                    return got;
                }
            }
        }
    });
    let port = Port::from_fd(OwnedFd::from(guest));
    let argv: Vec<Vec<u8>> = argv.iter().map(|a| a.as_bytes().to_vec()).collect();
    let start = Instant::now();
    let mut kmsg = kmsg;
    let exit = pump::run_command(
        &port,
        kmsg.as_deref_mut(),
        reaper,
        &argv,
        Default::default(),
    )
    .expect("the pump");
    pump::report_exit(&port, kmsg, &exit).expect("report");
    let elapsed = start.elapsed();
    let frames = reader.join().expect("the reader");
    drop(port);
    writer.join().expect("the writer");
    Run { frames, elapsed }
}

fn stdin_frames(data: &[u8], eof: bool) -> Vec<u8> {
    let mut wire = Vec::new();
    frames(STDIN, data, &mut wire);
    if eof {
        frame(STDIN_EOF, &[], &mut wire);
    }
    wire
}

/// Bytes that show a lost, doubled or swapped piece.
fn pattern(len: usize) -> Vec<u8> {
    let mut x: u32 = 0x1234_5678;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            x as u8
        })
        .collect()
}

fn a_command_with_output_and_a_status(reaper: &Reaper) {
    let r = run(
        reaper,
        &["sh", "-c", "echo out; echo err >&2; exit 7"],
        vec![],
        None,
    );
    assert_eq!(r.frames[0], (STARTED, vec![]));
    assert_eq!(r.events(), [STARTED, EXIT]);
    assert_eq!(r.payloads(STDOUT), b"out\n");
    assert_eq!(r.payloads(STDERR), b"err\n");
    assert_eq!(r.exit(), Exit::Exited(7));
}

fn stdin_round_trip(reaper: &Reaper) {
    let r = run(
        reaper,
        &["cat"],
        stdin_frames(b"hello\nworld\n", true),
        None,
    );
    assert_eq!(r.payloads(STDOUT), b"hello\nworld\n");
    assert_eq!(r.exit(), Exit::Exited(0));
}

fn megabytes_of_stdin_round_trip_exactly(reaper: &Reaper) {
    // More than the stdin buffer, the pipes and the socket hold together.
    let data = pattern(3 * pump::STDIN_BUFFER + 12345);
    let r = run(reaper, &["cat"], stdin_frames(&data, true), None);
    let out = r.payloads(STDOUT);
    assert_eq!(out.len(), data.len());
    assert!(out == data, "the bytes differ");
    assert!(r.frames.iter().all(|(_, p)| p.len() <= MAX_PAYLOAD));
    assert_eq!(r.exit(), Exit::Exited(0));
}

fn a_mebibyte_of_output_exactly(reaper: &Reaper) {
    let data = pattern(1 << 20);
    let file = std::env::temp_dir().join(format!("minivmm-init-pump-{}", std::process::id()));
    std::fs::write(&file, &data).expect("write the data");
    let r = run(
        reaper,
        &["cat", file.to_str().expect("utf-8")],
        vec![],
        None,
    );
    let _ = std::fs::remove_file(&file);
    assert!(r.payloads(STDOUT) == data, "the bytes differ");
    assert_eq!(r.exit(), Exit::Exited(0));
}

fn a_signal_death(reaper: &Reaper) {
    let r = run(reaper, &["sh", "-c", "kill -9 $$"], vec![], None);
    assert_eq!(r.events(), [STARTED, EXIT]);
    assert_eq!(r.exit(), Exit::Signaled(9));
}

fn a_missing_command(reaper: &Reaper) {
    let r = run(reaper, &["minivmm-no-such-command", "x"], vec![], None);
    assert_eq!(r.events(), [EXIT]);
    assert_eq!(
        r.exit(),
        Exit::NotFound("minivmm-no-such-command: not found".into())
    );
}

fn a_command_that_is_not_executable(reaper: &Reaper) {
    let r = run(reaper, &["/etc/passwd"], vec![], None);
    assert_eq!(r.events(), [EXIT]);
    assert_eq!(
        r.exit(),
        Exit::NotExecutable("/etc/passwd: permission denied".into())
    );
}

fn stdin_left_open_until_eof(reaper: &Reaper) {
    // Without STDIN_EOF `cat` would wait forever; the host closing the
    // channel ends stdin too. (Here: no EOF frame, the writer's data then
    // the socket's write side shut.)
    let (guest, host) = UnixStream::pair().expect("socketpair");
    (&host)
        .write_all(&stdin_frames(b"no eof\n", false))
        .expect("write");
    host.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let reader = std::thread::spawn(move || {
        let mut wire = Vec::new();
        (&host).read_to_end(&mut wire).expect("read");
        wire
    });
    let port = Port::from_fd(OwnedFd::from(guest));
    let exit = pump::run_command(&port, None, reaper, &[b"cat".to_vec()], Default::default())
        .expect("the pump");
    pump::report_exit(&port, None, &exit).expect("report");
    drop(port);
    let mut d = Deframer::default();
    d.feed(&reader.join().expect("the reader"));
    let got: Frames = std::iter::from_fn(|| d.next_frame().expect("a bad frame")).collect();
    let out: Vec<u8> = got
        .iter()
        .filter(|(k, _)| *k == STDOUT)
        .flat_map(|(_, p)| p.clone())
        .collect();
    assert_eq!(out, b"no eof\n");
    assert_eq!(got.last().map(|f| f.0), Some(EXIT));
}

fn a_command_that_ignores_its_stdin(reaper: &Reaper) {
    // The pipe breaks; the rest of the host's stdin is dropped, not kept.
    let data = pattern(4 * pump::STDIN_BUFFER);
    let r = run(
        reaper,
        &["sh", "-c", "exec 0<&-; sleep 0.2; echo done"],
        stdin_frames(&data, true),
        None,
    );
    assert_eq!(r.payloads(STDOUT), b"done\n");
    assert_eq!(r.exit(), Exit::Exited(0));
}

fn a_background_process_does_not_hold_up_the_end(reaper: &Reaper) {
    // The sleeper keeps stdout and stderr open for a minute.
    let r = run(
        reaper,
        &["sh", "-c", "sleep 60 & echo $!; exit 3"],
        vec![],
        None,
    );
    assert_eq!(r.exit(), Exit::Exited(3));
    assert!(r.elapsed < Duration::from_secs(10), "{:?}", r.elapsed);
    let out = String::from_utf8(r.payloads(STDOUT)).expect("utf-8");
    let sleeper: libc::pid_t = out.trim().parse().expect("a pid");
    // SAFETY: no pointers.
    assert_eq!(unsafe { libc::kill(sleeper, libc::SIGKILL) }, 0);
    let mut status = 0;
    // SAFETY: `status` is a valid place for the status.
    assert_eq!(unsafe { libc::waitpid(sleeper, &mut status, 0) }, sleeper);
}

fn orphans_are_reaped(reaper: &Reaper) {
    // The subshell exits at once; its child is an orphan that ends while the
    // command still runs. The reaper takes it.
    let r = run(
        reaper,
        &["sh", "-c", "(sh -c 'exit 5' &); sleep 0.5"],
        vec![],
        None,
    );
    assert_eq!(r.exit(), Exit::Exited(0));
    let mut status = 0;
    // SAFETY: `status` is a valid place for the status.
    let left = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    assert_eq!(left, -1, "a child was left to reap");
}

/// A stand-in for `/dev/kmsg` that keeps records apart, and its writing end.
fn fake_kmsg(records: &[&str]) -> (Kmsg, std::fs::File) {
    let mut fds = [0; 2];
    // SAFETY: `fds` has room for the two descriptors.
    let rc = unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    };
    assert_eq!(rc, 0, "socketpair");
    // SAFETY: a new descriptor we own.
    let ours = unsafe { OwnedFd::from_raw_fd(fds[0]) };
    // SAFETY: a new descriptor we own.
    let theirs = unsafe { std::fs::File::from_raw_fd(fds[1]) };
    for r in records {
        (&theirs).write_all(r.as_bytes()).expect("a record");
    }
    (Kmsg::from_fd(ours).expect("kmsg"), theirs)
}

fn verbose_kernel_log_goes_to_the_host(reaper: &Reaper) {
    let (mut kmsg, _src) = fake_kmsg(&["6,1,0,-;one\n", "6,2,0,-;two\n"]);
    kmsg.set_verbose(true);
    let r = run(reaper, &["sh", "-c", "sleep 0.1"], vec![], Some(&mut kmsg));
    assert_eq!(r.payloads(KMSG), b"6,1,0,-;one\n6,2,0,-;two\n");
    assert_eq!(r.exit(), Exit::Exited(0));
}

fn quiet_kernel_log_sends_the_last_records_at_once(reaper: &Reaper) {
    let records: Vec<String> = (0..KEPT + 5).map(|i| format!("6,{i},0,-;r{i}\n")).collect();
    let records: Vec<&str> = records.iter().map(String::as_str).collect();
    let (mut kmsg, _src) = fake_kmsg(&records);
    // As the init does with the boot's records before the command starts.
    kmsg.read_records(usize::MAX);
    let r = run(reaper, &["echo", "hi"], vec![], Some(&mut kmsg));
    let kinds: Vec<u8> = r.frames.iter().map(|(k, _)| *k).collect();
    assert_eq!(kinds[0], STARTED);
    assert_eq!(
        &kinds[1..=KEPT],
        &[KMSG; KEPT][..],
        "the kernel log comes next, whole"
    );
    assert!(kinds.iter().position(|k| *k == STDOUT).expect("stdout") > KEPT);
    let kept: Vec<&Vec<u8>> = r
        .frames
        .iter()
        .filter(|(k, _)| *k == KMSG)
        .map(|(_, p)| p)
        .collect();
    assert_eq!(kept.len(), KEPT, "only the last {KEPT}");
    assert_eq!(kept[0], b"6,5,0,-;r5\n");
    assert_eq!(r.exit(), Exit::Exited(0));
}

fn main() {
    let reaper = Reaper::new().expect("block SIGCHLD");
    // SAFETY: no pointers.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1) };
    assert_eq!(rc, 0, "PR_SET_CHILD_SUBREAPER");
    let tests: &[(&str, Test)] = &[
        (
            "a_command_with_output_and_a_status",
            a_command_with_output_and_a_status,
        ),
        ("stdin_round_trip", stdin_round_trip),
        (
            "megabytes_of_stdin_round_trip_exactly",
            megabytes_of_stdin_round_trip_exactly,
        ),
        ("a_mebibyte_of_output_exactly", a_mebibyte_of_output_exactly),
        ("a_signal_death", a_signal_death),
        ("a_missing_command", a_missing_command),
        (
            "a_command_that_is_not_executable",
            a_command_that_is_not_executable,
        ),
        ("stdin_left_open_until_eof", stdin_left_open_until_eof),
        (
            "a_command_that_ignores_its_stdin",
            a_command_that_ignores_its_stdin,
        ),
        ("orphans_are_reaped", orphans_are_reaped),
        (
            "a_background_process_does_not_hold_up_the_end",
            a_background_process_does_not_hold_up_the_end,
        ),
        (
            "verbose_kernel_log_goes_to_the_host",
            verbose_kernel_log_goes_to_the_host,
        ),
        (
            "quiet_kernel_log_sends_the_last_records_at_once",
            quiet_kernel_log_sends_the_last_records_at_once,
        ),
    ];
    let filters: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| !a.starts_with('-'))
        .collect();
    let chosen: Vec<_> = tests
        .iter()
        .filter(|(name, _)| filters.is_empty() || filters.iter().any(|f| name.contains(f.as_str())))
        .collect();
    println!("\nrunning {} tests", chosen.len());
    for (name, test) in &chosen {
        let start = Instant::now();
        test(&reaper);
        println!("test {name} ... ok ({:.2?})", start.elapsed());
    }
    println!("\ntest result: ok. {} passed", chosen.len());
}
