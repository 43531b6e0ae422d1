use super::*;

#[test]
fn a_share_names_a_host_directory_and_a_guest_path() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().display();
    let s: ShareSpec = format!("{d}:/mnt/data").parse().unwrap();
    assert_eq!(s.host, dir.path().canonicalize().unwrap());
    assert_eq!(s.guest, PathBuf::from("/mnt/data"));
    assert!(!s.read_only);
    let s: ShareSpec = format!("{d}:/out:ro").parse().unwrap();
    assert!(s.read_only);
    assert_eq!(s.guest, PathBuf::from("/out"));
    let s: ShareSpec = format!("{d}:/out:rw").parse().unwrap();
    assert!(!s.read_only);
    assert_eq!(ShareSpec::tag(0), "share0");
    assert_eq!(ShareSpec::tag(3), "share3");
}

#[test]
fn bad_shares_say_what_is_wrong() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, b"x").unwrap();
    let d = dir.path().display();
    let err = |s: String| s.parse::<ShareSpec>().unwrap_err();
    assert!(err(format!("{d}")).contains("no guest path"));
    assert!(err(":/mnt".into()).contains("no host directory"));
    assert!(err(format!("{d}:mnt")).contains("must be absolute"));
    let e = err(format!("{d}/missing:/mnt"));
    assert!(e.contains("missing") && e.contains("No such file"), "{e}");
    let e = err(format!("{}:/mnt", file.display()));
    assert!(e.contains("is not a directory"), "{e}");
}

#[test]
fn virtiofsd_is_found_or_the_error_names_the_package() {
    let dir = tempfile::tempdir().unwrap();
    let plain = dir.path().join("plain");
    std::fs::write(&plain, b"").unwrap();
    assert_eq!(
        find_virtiofsd(Some(&plain)),
        Err(FindError::NotExecutable(plain.clone()))
    );
    assert_eq!(
        find_virtiofsd(Some(Path::new("/bin/sh"))),
        Ok(PathBuf::from("/bin/sh"))
    );
    let msg = FindError::Missing.to_string();
    assert!(msg.contains("qemu-system-common"), "{msg}");
    assert!(msg.contains("--virtiofsd PATH"), "{msg}");
}
