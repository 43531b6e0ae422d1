//! Reading the kernel log (`/dev/kmsg`) and forwarding it to the host as it
//! comes, whatever the console level, so the host has the last lines when a
//! run fails (a panic, a hang). Records that arrive together are sent in one
//! write; unless verbose, only the last [`KEPT`] of them (the host keeps no
//! more than that).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use run_protocol::KMSG;

use crate::port::Port;
use crate::sys;

/// Records sent from one batch when not verbose (the host keeps as many).
pub const KEPT: usize = 50;

/// Records waiting in a verbose run before the oldest are dropped.
const VERBOSE_CAP: usize = 4096;

/// Room for one record (the kernel's limit is about 1 KiB of text plus its
/// dictionary); a smaller buffer makes the read fail with EINVAL.
const RECORD_MAX: usize = 8192;

/// The kernel log, read from its oldest record on.
pub struct Kmsg {
    file: File,
    verbose: bool,
    /// Read, not yet sent.
    pending: VecDeque<Vec<u8>>,
    /// It failed or ended: no more reading.
    done: bool,
}

impl Kmsg {
    /// Opens `/dev/kmsg` (non-blocking).
    pub fn open() -> io::Result<Kmsg> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")?;
        Ok(Kmsg::from_file(file))
    }

    /// Reads records from `fd` instead (tests use a SOCK_SEQPACKET socket);
    /// makes it non-blocking.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Kmsg> {
        sys::set_nonblocking(&fd)?;
        Ok(Kmsg::from_file(File::from(fd)))
    }

    fn from_file(file: File) -> Kmsg {
        Kmsg {
            file,
            verbose: false,
            pending: VecDeque::with_capacity(KEPT + 1),
            done: false,
        }
    }

    /// Sends every record (else only the last [`KEPT`] of a batch).
    pub fn set_verbose(&mut self, verbose: bool) {
        self.verbose = verbose;
    }

    /// Whether there can be more to read.
    pub fn active(&self) -> bool {
        !self.done
    }

    /// Reads at most `max` of the records that are there, without sending
    /// them (the boot's records are read this way before the command starts:
    /// no writes to the host for records it would drop).
    pub fn read_records(&mut self, max: usize) {
        let cap = if self.verbose { VERBOSE_CAP } else { KEPT };
        let mut buf = vec![0u8; RECORD_MAX];
        let mut n = 0;
        while n < max && !self.done {
            match (&self.file).read(&mut buf) {
                Ok(0) => self.done = true,
                Ok(len) => {
                    n += 1;
                    if self.pending.len() == cap {
                        self.pending.pop_front();
                    }
                    self.pending.push_back(buf[..len].to_vec());
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Records were overwritten before we read them; the next
                // read goes on from the oldest one left.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Err(_) => self.done = true,
            }
        }
    }

    /// Sends what was read, in one write.
    pub fn send_pending(&mut self, port: &Port) -> io::Result<()> {
        if self.pending.is_empty() {
            return Ok(());
        }
        let mut wire = Vec::new();
        for record in self.pending.drain(..) {
            run_protocol::frames(KMSG, &record, &mut wire);
        }
        port.write_frames(&wire)
    }

    /// Reads at most `max` records and sends them.
    pub fn forward(&mut self, port: &Port, max: usize) -> io::Result<()> {
        self.read_records(max);
        self.send_pending(port)
    }

    /// Before the end: sends what is left.
    pub fn flush(&mut self, port: &Port) -> io::Result<()> {
        self.forward(port, 100_000)
    }
}

impl AsFd for Kmsg {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// A record source (a SOCK_SEQPACKET pair keeps the records apart, as
    /// `/dev/kmsg` does) and a channel whose host end is read at the end.
    fn setup() -> (Kmsg, File, Port, UnixStream) {
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
        assert_eq!(rc, 0);
        let ours = sys::own(fds[0]).unwrap();
        let theirs = sys::own(fds[1]).unwrap();
        let kmsg = Kmsg::from_fd(ours.into()).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        (kmsg, theirs, Port::from_fd(a.into()), b)
    }

    fn frames(port: Port, host: UnixStream) -> Vec<(u8, Vec<u8>)> {
        drop(port);
        let mut wire = Vec::new();
        (&host).read_to_end(&mut wire).unwrap();
        let mut d = run_protocol::Deframer::default();
        d.feed(&wire);
        std::iter::from_fn(|| d.next_frame().unwrap()).collect()
    }

    #[test]
    fn a_batch_sends_its_last_records_in_one_write() {
        let (mut kmsg, mut src, port, host) = setup();
        for i in 0..KEPT + 10 {
            src.write_all(format!("6,{i},0,-;line {i}\n").as_bytes())
                .unwrap();
        }
        // Read as the boot's records are: nothing sent yet.
        kmsg.read_records(5);
        kmsg.read_records(1000);
        assert!(kmsg.active());
        src.write_all(b"3,99,0,-;late\n").unwrap();
        kmsg.flush(&port).unwrap();
        src.write_all(b"3,100,0,-;later\n").unwrap();
        kmsg.forward(&port, 64).unwrap();
        let got = frames(port, host);
        assert_eq!(got.len(), KEPT + 1);
        assert!(got.iter().all(|(k, _)| *k == KMSG));
        assert_eq!(got[0].1, b"6,11,0,-;line 11\n");
        assert_eq!(got[KEPT - 1].1, b"3,99,0,-;late\n");
        assert_eq!(got[KEPT].1, b"3,100,0,-;later\n");
    }

    #[test]
    fn verbose_runs_send_every_record() {
        let (mut kmsg, mut src, port, host) = setup();
        kmsg.set_verbose(true);
        for i in 0..KEPT + 10 {
            src.write_all(format!("6,{i},0,-;line {i}\n").as_bytes())
                .unwrap();
        }
        kmsg.forward(&port, 1000).unwrap();
        drop(src);
        kmsg.forward(&port, 100).unwrap();
        assert!(!kmsg.active());
        kmsg.flush(&port).unwrap();
        let got = frames(port, host);
        assert_eq!(got.len(), KEPT + 10);
        assert_eq!(got[0], (KMSG, b"6,0,0,-;line 0\n".to_vec()));
    }
}
