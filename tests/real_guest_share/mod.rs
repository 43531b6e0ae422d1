//! `--share` in a plain VM: Debian's cloud kernel (virtiofs and fuse modules
//! in the agent image) mounts the share by its tag, a system reset brings a
//! fresh daemon the rebooted guest mounts again, and no daemon outlives
//! minivmm.

use minivmm_tests::{real_guest_available, temp_dir_with, virtiofsd_serving, Qmp};
use serde_json::json;

use super::{boot_initrd, qmp_socket, BOOT};

#[test]
fn plain_vm_share_by_tag_survives_a_reset() {
    if !real_guest_available("plain_vm_share_by_tag_survives_a_reset") {
        return;
    }
    let dir = temp_dir_with("plain-share", "f", b"share-from-host\n");
    let (sock, q_spec) = qmp_socket("rg-share");
    let share = format!("{}:/unused-in-a-plain-vm", dir.display());
    let agent = format!("unix:{}", sock.with_file_name("share.qga").display());
    // Each boot mounts the share by its tag, reads the host's file and
    // appends a line the host reads.
    let append = "console=ttyS0 quiet minivmm.action=wait -- mount -t virtiofs share0 /mnt ; \
        cat /mnt/f ; echo boot >> /mnt/boots ; echo appended";
    let mut vm = boot_initrd(
        "vmlinuz",
        "agent-initrd.img",
        append,
        &["--share", &share, "--qmp", &q_spec, "--agent", &agent],
    );
    let mut q = Qmp::negotiated(&sock);
    vm.wait_line(BOOT, |l| l.trim_end() == "share-from-host");
    // No writeback cache: once the guest's write returned, the host has it.
    vm.wait_line(BOOT, |l| l.trim_end() == "appended");
    let boots = || std::fs::read_to_string(dir.join("boots")).unwrap_or_default();
    assert_eq!(boots(), "boot\n");
    let first = virtiofsd_serving(&dir);
    assert!(!first.is_empty(), "a daemon serves the share");

    assert_eq!(
        q.cmd(r#"{"execute":"system_reset"}"#),
        json!({"return": {}})
    );
    q.wait_event("RESET");
    vm.wait_line(BOOT, |l| l.trim_end() == "share-from-host");
    vm.wait_line(BOOT, |l| l.trim_end() == "appended");
    assert_eq!(boots(), "boot\nboot\n", "the share works after the reset");
    let second = virtiofsd_serving(&dir);
    assert_eq!(
        second.len(),
        first.len(),
        "one daemon, as before: {second:?}"
    );
    assert!(
        second.iter().all(|p| !first.contains(p)),
        "a fresh daemon after the reset: {first:?} then {second:?}"
    );

    assert_eq!(q.cmd(r#"{"execute":"quit"}"#), json!({"return": {}}));
    let (st, err) = vm.wait_exit(BOOT);
    assert_eq!(st.code(), Some(0), "{err}");
    assert_eq!(
        virtiofsd_serving(&dir),
        Vec::<String>::new(),
        "no daemon left"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
