use super::*;
use vhost::vhost_user::{Frontend, VhostUserFrontend};
use vhost::VhostBackend;

use crate::share::test_virtiofsd as virtiofsd;

fn share(dir: &Path, read_only: bool) -> ShareSpec {
    ShareSpec {
        host: dir.canonicalize().unwrap(),
        guest: "/mnt".into(),
        read_only,
    }
}

/// Processes whose parent is `pid`.
fn children(pid: u32) -> Vec<u32> {
    let mut v = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(p) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so after the ')'.
        let after = &stat[stat.rfind(')').unwrap() + 2..];
        let ppid: u32 = after.split(' ').nth(1).unwrap().parse().unwrap();
        if ppid == pid {
            v.push(p);
        }
    }
    v
}

/// Gone, or a zombie nobody needs (killed, waiting for its reaper).
fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(stat) => stat[stat.rfind(')').unwrap() + 2..].starts_with('Z'),
    }
}

/// Gone within 5 s: a process killed with its group dies asynchronously (the
/// daemon's own child is not ours to reap), so its exit is awaited on a pidfd.
fn gone_soon(pid: u32) -> bool {
    // SAFETY: pidfd_open(2) with a pid and no flags; the result is checked.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if fd < 0 {
        return gone(pid); // ESRCH: already reaped.
    }
    let mut pfd = libc::pollfd {
        fd: fd as i32,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd; the pidfd becomes readable when it exits.
    let ready = unsafe { libc::poll(&mut pfd, 1, 5000) };
    // SAFETY: closing the pidfd opened above.
    unsafe { libc::close(fd as i32) };
    ready == 1 || gone(pid)
}

#[test]
fn a_daemon_answers_vhost_user_and_is_gone_when_dropped() {
    let Some(bin) = virtiofsd("a_daemon_answers_vhost_user_and_is_gone_when_dropped") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let flavor = Flavor::detect(&bin).unwrap();
    let mut d = Virtiofsd::start(&bin, flavor, &share(dir.path(), false), "share0").unwrap();
    let mut fe = Frontend::from_stream(d.take_stream().unwrap(), 2);
    fe.set_owner().unwrap();
    let features = fe.get_features().unwrap();
    assert_ne!(
        features & (1 << 30),
        0,
        "VHOST_USER_F_PROTOCOL_FEATURES: {features:#x}"
    );
    assert!(fe.get_protocol_features().is_ok());
    let pid = d.pid();
    let kids = children(pid);
    assert!(d.running());
    drop(d);
    assert!(gone(pid), "virtiofsd {pid} outlived its drop");
    for k in kids {
        assert!(
            gone_soon(k),
            "virtiofsd's child {k} outlived the drop by 5 s"
        );
    }
}

#[test]
fn a_read_only_share_is_a_read_only_mount_for_the_daemon() {
    let Some(bin) = virtiofsd("a_read_only_share_is_a_read_only_mount_for_the_daemon") else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().canonicalize().unwrap();
    let flavor = Flavor::detect(&bin).unwrap();
    let d = Virtiofsd::start(&bin, flavor, &share(&path, true), "share0").unwrap();
    let info = std::fs::read_to_string(format!("/proc/{}/mountinfo", d.pid())).unwrap();
    // id parent major:minor root mountpoint options ...
    let line = info
        .lines()
        .find(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap()))
        .unwrap_or_else(|| panic!("no mount at {} in {info}", path.display()));
    let opts = line.split(' ').nth(5).unwrap();
    assert!(opts.split(',').any(|o| o == "ro"), "{line}");
    // minivmm's own view is unchanged.
    let mine = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mine
        .lines()
        .any(|l| l.split(' ').nth(4) == Some(path.to_str().unwrap())));
}

#[test]
fn a_daemon_that_fails_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir.path().join("virtiofsd");
    std::fs::write(&fake, "#!/bin/sh\necho 'fake: bad option' >&2\nexit 3\n").unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let detail = match Virtiofsd::start(&fake, Flavor::Qemu, &share(dir.path(), false), "share1") {
        // It may end before or after minivmm connected.
        Err(DaemonError::Exited { tag, detail }) => {
            assert_eq!(tag, "share1");
            detail
        }
        Err(e) => panic!("{e}"),
        Ok(mut d) => {
            let fe = Frontend::from_stream(d.take_stream().unwrap(), 2);
            assert!(fe.set_owner().and_then(|()| fe.get_features()).is_err());
            d.exit_output()
        }
    };
    assert!(detail.contains("fake: bad option"), "{detail}");
    assert!(detail.contains("status 3"), "{detail}");
}

#[test]
fn the_flavors_take_their_own_arguments() {
    let q = Flavor::Qemu.args(Path::new("/srv/x"));
    assert_eq!(q[0], "--fd=3");
    assert!(q.iter().any(|a| a == "source=/srv/x"));
    let r = Flavor::Rust.args(Path::new("/srv/x"));
    assert_eq!(r[0], "--fd=3");
    assert!(r
        .windows(2)
        .any(|w| w[0] == "--shared-dir" && w[1] == "/srv/x"));
    assert!(!q
        .iter()
        .chain(&r)
        .any(|a| a.to_string_lossy().contains("sandbox")));
    // The host's root cannot be pivot_root'ed into: the chroot sandbox.
    let q = Flavor::Qemu.args(Path::new("/"));
    assert!(q.iter().any(|a| a == "sandbox=chroot"));
    let r = Flavor::Rust.args(Path::new("/"));
    assert!(r
        .windows(2)
        .any(|w| w[0] == "--sandbox" && w[1] == "chroot"));
}

#[test]
fn mounts_below_a_read_only_share_are_found() {
    assert_eq!(unescape_mountinfo(r"/a\040b"), b"/a b");
    assert_eq!(unescape_mountinfo(r"/p\q\0"), br"/p\q\0", "not an escape");
    assert_eq!(unescape_mountinfo(r"/x\011y"), b"/x\ty");
    let below_root = submounts(Path::new("/"));
    assert!(
        below_root.iter().any(|p| p == Path::new("/proc")),
        "{below_root:?}"
    );
    assert!(!below_root.iter().any(|p| p == Path::new("/")));
    assert!(submounts(Path::new("/proc/self/fd")).is_empty());
}
