use super::*;
use crate::reaper::exit_of;
use crate::testutil::{fork_lock, TempDir};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

fn put(path: &Path, contents: &str, mode: u32) {
    std::fs::write(path, contents).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

fn args(argv: &[&str]) -> Vec<Vec<u8>> {
    argv.iter().map(|a| a.as_bytes().to_vec()).collect()
}

/// Runs `argv` to its end (its output must fit in the pipe); its stdout
/// and how it ended, or why it did not start.
fn run(argv: &[&str], path: &str) -> Result<(String, Exit), Exit> {
    let child = spawn(&args(argv), path, Place::default())?;
    drop(child.stdin);
    let exit = wait(child.pid);
    let mut out = Vec::new();
    (&child.stdout).read_to_end(&mut out).unwrap();
    Ok((String::from_utf8(out).unwrap(), exit))
}

fn wait(pid: libc::pid_t) -> Exit {
    let mut status = 0;
    // SAFETY: `status` is a valid place for the status.
    let got = unsafe { libc::waitpid(pid, &mut status, 0) };
    assert_eq!(got, pid);
    exit_of(status)
}

#[test]
fn candidates_follow_execvp() {
    let c = |n: &str, p: &str| -> Vec<String> {
        candidates(n.as_bytes(), p)
            .into_iter()
            .map(|c| String::from_utf8(c).unwrap())
            .collect()
    };
    assert_eq!(c("sh", "/a::/b"), ["/a/sh", "./sh", "/b/sh"]);
    assert_eq!(c("./x", "/a"), ["./x"]);
    assert_eq!(c("/bin/sh", "/a"), ["/bin/sh"]);
    assert!(c("", "/a").is_empty());
}

#[test]
fn failures_round_trip_and_read_well() {
    let f = Failure {
        errno: libc::EACCES,
        index: 1,
        exists: true,
    };
    assert_eq!(Failure::decode(&f.encode()), Some(f));
    assert_eq!(Failure::decode(&[1, 2]), None);
    let tries = vec![b"/a/x".to_vec(), b"/b/x".to_vec()];
    let f = |errno, index, exists| Failure {
        errno,
        index,
        exists,
    };
    assert_eq!(
        classify("x", &tries, f(libc::ENOENT, 1, false)),
        Exit::NotFound("x: not found".into())
    );
    assert_eq!(
        classify("x", &tries, f(libc::EACCES, 1, false)),
        Exit::NotExecutable("/b/x: permission denied".into())
    );
    assert!(matches!(
        classify("x", &tries, f(libc::ENOENT, 0, true)),
        Exit::NotExecutable(m) if m.starts_with("/a/x: cannot be run: its interpreter")
    ));
    assert!(matches!(
        classify("x", &tries, f(libc::E2BIG, 0, false)),
        Exit::NotExecutable(m) if m.starts_with("/a/x: Argument list too long")
    ));
}

#[test]
fn a_missing_command_is_not_found() {
    let _lock = fork_lock();
    let dir = TempDir::new("path");
    let path = dir.path().to_str().unwrap();
    let not_found = |m: &str| Err(Exit::NotFound(format!("{m}: not found")));
    assert_eq!(
        run(&["minivmm-no-such-command"], path),
        not_found("minivmm-no-such-command")
    );
    assert_eq!(
        run(&["/nonexistent/tool"], path),
        not_found("/nonexistent/tool")
    );
    assert_eq!(
        run(&["/etc/passwd/tool"], path),
        not_found("/etc/passwd/tool")
    );
    assert_eq!(run(&[""], path), not_found(""));
}

#[test]
fn a_command_that_cannot_run_is_not_executable() {
    let _lock = fork_lock();
    let dir = TempDir::new("path");
    let d = dir.path();
    put(&d.join("noexec"), "#!/bin/sh\necho hi\n", 0o644);
    put(&d.join("garbage"), "\x01\x02 not a program\n", 0o755);
    put(&d.join("nointerp"), "#!/nonexistent/interp\n", 0o755);
    std::fs::create_dir(d.join("adir")).unwrap();
    let path = d.to_str().unwrap();
    let not_exec = |name: &str, want: &str| match run(&[name], path) {
        Err(Exit::NotExecutable(m)) => {
            assert!(m.starts_with(&format!("{}/{name}: ", d.display())), "{m}");
            assert!(m.contains(want), "{name}: {m}");
        }
        other => panic!("{name}: {other:?}"),
    };
    not_exec("noexec", "permission denied");
    not_exec("garbage", "exec format error");
    not_exec("nointerp", "its interpreter");
    not_exec("adir", "permission denied");
    // By its path, too.
    let by_path = d.join("noexec");
    assert!(matches!(
        run(&[by_path.to_str().unwrap()], "/nonexistent"),
        Err(Exit::NotExecutable(m)) if m.ends_with("noexec: permission denied")
    ));
}

#[test]
fn the_lookup_goes_on_past_a_file_it_may_not_run() {
    let _lock = fork_lock();
    let (d1, d2) = (TempDir::new("p1"), TempDir::new("p2"));
    put(&d1.path().join("tool"), "#!/bin/sh\necho d1\n", 0o644);
    put(
        &d2.path().join("tool"),
        "#!/bin/sh\necho d2 \"$0\" \"$1\"\nexit 3\n",
        0o755,
    );
    let path = format!("{}:{}", d1.path().display(), d2.path().display());
    let (out, exit) = run(&["tool", "arg one"], &path).unwrap();
    assert_eq!(out, format!("d2 {}/tool arg one\n", d2.path().display()));
    assert_eq!(exit, Exit::Exited(3));
}

#[test]
fn the_command_runs_in_its_place() {
    let _lock = fork_lock();
    let d = TempDir::new("place");
    put(
        &d.path().join("tool"),
        "#!/bin/sh\necho \"$(pwd)\"\n",
        0o755,
    );
    let cwd = d.path().as_os_str().as_encoded_bytes();
    let child = spawn(
        &args(&["./tool"]),
        PATH,
        Place {
            root: Some(b"/"),
            cwd,
        },
    )
    .unwrap();
    drop(child.stdin);
    assert_eq!(wait(child.pid), Exit::Exited(0));
    let mut out = Vec::new();
    (&child.stdout).read_to_end(&mut out).unwrap();
    assert_eq!(
        out,
        [cwd, b"\n"].concat(),
        "relative to its working directory"
    );
    let missing = Place {
        root: Some(b"/nonexistent-root"),
        cwd: b"/",
    };
    assert!(matches!(
        spawn(&args(&["true"]), PATH, missing),
        Err(Exit::InitFailed(m)) if m.contains("set up the child")
    ));
}

#[test]
fn a_command_that_exits_127_is_not_mistaken_for_a_missing_one() {
    let _lock = fork_lock();
    assert_eq!(
        run(&["sh", "-c", "exit 127"], PATH),
        Ok((String::new(), Exit::Exited(127)))
    );
}

/// A `Sig...:` mask of /proc/PID/status.
fn mask(status: &str, field: &str) -> u64 {
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    u64::from_str_radix(line[field.len()..].trim(), 16).unwrap()
}

#[test]
fn the_command_gets_a_clean_slate() {
    let _lock = fork_lock();
    let (out, exit) = run(
        &[
            "sh",
            "-c",
            "echo \"$PATH|$HOME|$TERM|$(pwd)\"; cat /proc/self/status",
        ],
        PATH,
    )
    .unwrap();
    assert_eq!(exit, Exit::Exited(0));
    let (first, status) = out.split_once('\n').unwrap();
    assert_eq!(first, format!("{PATH}|/root|linux|/"));
    assert_eq!(mask(status, "SigBlk:"), 0);
    // Rust's runtime ignores SIGPIPE (here, and in the init); the
    // command must not inherit that.
    let pipe = 1 << (libc::SIGPIPE - 1);
    let ours = std::fs::read_to_string("/proc/self/status").unwrap();
    assert_ne!(mask(&ours, "SigIgn:") & pipe, 0);
    assert_eq!(mask(status, "SigIgn:") & pipe, 0);
}

#[test]
fn the_command_leads_its_own_session() {
    let _lock = fork_lock();
    let child = spawn(&args(&["cat"]), PATH, Place::default()).unwrap();
    // SAFETY: no pointers.
    let sid = unsafe { libc::getsid(child.pid) };
    assert_eq!(sid, child.pid);
    drop(child.stdin);
    assert_eq!(wait(child.pid), Exit::Exited(0));
}
