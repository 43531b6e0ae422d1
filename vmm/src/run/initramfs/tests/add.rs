//! Tests of `--add` (files, directories, ELF dependencies) and of the whole build.

use std::os::unix::fs::PermissionsExt;

use super::*;

// ---- --add ----

#[test]
fn add_spec_parsing() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    fs::write(&file, "x").unwrap();
    let f = file.to_str().unwrap();

    let s = AddSpec::parse(f).unwrap();
    assert_eq!((s.host.as_path(), s.guest.as_str()), (file.as_path(), f));
    let s = AddSpec::parse(&format!("{f}:/opt//x/")).unwrap();
    assert_eq!(
        (s.host.as_path(), s.guest.as_str()),
        (file.as_path(), "/opt/x")
    );
    let s: AddSpec = format!("{f}:/").parse().unwrap();
    assert_eq!(s.guest, "/");

    // A relative HOST goes to the same path made absolute.
    let cwd = std::env::current_dir().unwrap();
    let rel = "Cargo.toml";
    if cwd.join(rel).exists() {
        let s = AddSpec::parse(rel).unwrap();
        assert_eq!(s.guest, cwd.join(rel).to_str().unwrap());
    }

    let err = AddSpec::parse(&format!("{f}:opt/x")).unwrap_err();
    assert!(
        matches!(err, InitramfsError::AddRelativeGuest { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("\"opt/x\""), "{err}");

    let err = AddSpec::parse("/no/such/file:/x").unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, InitramfsError::AddMissing { .. }), "{msg}");
    assert!(
        msg.contains("/no/such/file") && !msg.contains("No such file"),
        "{msg}"
    );

    // A host name with a colon in it.
    let colon = dir.path().join("a:b");
    fs::write(&colon, "x").unwrap();
    let s = AddSpec::parse(colon.to_str().unwrap()).unwrap();
    assert_eq!(s.host, colon);
    let s = AddSpec::parse(&format!("{}:/c", colon.display())).unwrap();
    assert_eq!(
        (s.host.as_path(), s.guest.as_str()),
        (colon.as_path(), "/c")
    );
}

/// `/bin/sh` on this host, if it is a dynamically linked ELF file.
fn dynamic_shell() -> Option<&'static Path> {
    ["/bin/sh", "/usr/bin/env"]
        .into_iter()
        .map(Path::new)
        .find(|p| read_elf_info(p).is_some_and(|i| i.interp.is_some() && i.kind == NATIVE))
        .or_else(|| {
            eprintln!(
                "SKIPPED: neither /bin/sh nor /usr/bin/env is a dynamically linked ELF file here"
            );
            None
        })
}

#[test]
fn add_dynamic_binary_brings_its_loader_and_libraries() {
    let Some(sh) = dynamic_shell() else {
        return;
    };
    let info = read_elf_info(sh).unwrap();
    let mut plan = InitramfsPlan::new();
    let spec = AddSpec::parse(&format!("{}:/bin/mysh", sh.display())).unwrap();
    plan.add(&spec, &LibrarySearch::host()).unwrap();

    let e = plan.get("/bin/mysh").unwrap();
    assert_eq!(e.kind, EntryKind::File(Contents::Host(sh.to_path_buf())));
    assert_eq!(e.mode & 0o111, 0o111);
    let interp = info.interp.unwrap();
    let ld = plan.get(&interp).unwrap();
    assert_eq!(ld.origin, Origin::Dependency);
    assert!(matches!(ld.kind, EntryKind::File(Contents::Host(_))));
    if cfg!(target_arch = "x86_64") {
        assert_eq!(interp, "/lib64/ld-linux-x86-64.so.2");
    }
    let ld_name = interp.rsplit('/').next().unwrap();
    let copies = plan.paths().filter(|p| p.ends_with(ld_name)).count();
    assert_eq!(copies, 1, "libc's DT_NEEDED of the loader is the loader");
    let libc: Vec<&str> = plan.paths().filter(|p| p.ends_with("/libc.so.6")).collect();
    assert_eq!(libc.len(), 1, "{:?}", plan.paths().collect::<Vec<_>>());
    assert_eq!(plan.get(libc[0]).unwrap().origin, Origin::Dependency);
    // Where the loader looks for it (the host path where it was found).
    assert!(Path::new(libc[0]).is_file());

    let archive = plan.to_cpio().unwrap();
    let parsed = parse(&archive);
    check_order(&parsed);
    let ld = find(&parsed, &interp[1..]);
    assert_eq!(ld.1 & S_IFMT, S_IFREG, "stored as a regular file");
    assert_eq!(ld.3, fs::read(&interp).unwrap());
    assert_eq!(find(&parsed, "bin/mysh").3, fs::read(sh).unwrap());
}

#[test]
fn add_missing_library_is_an_error() {
    let Some(sh) = dynamic_shell() else {
        return;
    };
    let nowhere = LibrarySearch {
        conf_dirs: vec![],
        default_dirs: vec![PathBuf::from("/nonexistent/lib")],
    };
    let spec = AddSpec::parse(sh.to_str().unwrap()).unwrap();
    let err = InitramfsPlan::new().add(&spec, &nowhere).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, InitramfsError::LibraryNotFound { .. }),
        "{msg}"
    );
    assert!(
        msg.contains(&sh.display().to_string()) && msg.contains("libc.so.6"),
        "{msg}"
    );
    assert!(msg.contains("/nonexistent/lib"), "{msg}");
}

#[test]
fn add_static_file_alone_and_directories() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("tree");
    fs::create_dir_all(root.join("sub/deeper")).unwrap();
    fs::write(root.join("script"), "#!/bin/sh\necho hi\n").unwrap();
    fs::set_permissions(root.join("script"), fs::Permissions::from_mode(0o750)).unwrap();
    fs::write(root.join("sub/deeper/data"), "data").unwrap();
    std::os::unix::fs::symlink("../script", root.join("sub/link")).unwrap();
    let _sock = std::os::unix::net::UnixListener::bind(root.join("sock")).unwrap();

    // A file that is no ELF file comes alone.
    let mut plan = InitramfsPlan::new();
    let spec = AddSpec::parse(&format!("{}:/usr/bin/s", root.join("script").display())).unwrap();
    plan.add(&spec, &LibrarySearch::host()).unwrap();
    assert_eq!(
        plan.paths().collect::<Vec<_>>(),
        ["/usr", "/usr/bin", "/usr/bin/s"]
    );
    assert_eq!(plan.get("/usr/bin/s").unwrap().mode, 0o750);

    // A statically linked ELF file too (if the host has one).
    let ldconfig = ["/sbin/ldconfig", "/usr/sbin/ldconfig"]
        .into_iter()
        .map(Path::new)
        .find(|p| read_elf_info(p).is_some_and(|i| i.interp.is_none() && i.needed.is_empty()));
    match ldconfig {
        Some(p) => {
            let mut plan = InitramfsPlan::new();
            plan.add(
                &AddSpec::parse(&format!("{}:/s", p.display())).unwrap(),
                &LibrarySearch::host(),
            )
            .unwrap();
            assert_eq!(plan.paths().collect::<Vec<_>>(), ["/s"]);
        }
        None => eprintln!("SKIPPED: no statically linked ldconfig on this host"),
    }

    // A directory, recursively: links as links, the socket left out.
    let mut plan = InitramfsPlan::new();
    let spec = AddSpec::parse(&format!("{}:/opt/t", root.display())).unwrap();
    plan.add(&spec, &LibrarySearch::host()).unwrap();
    assert_eq!(
        plan.paths().collect::<Vec<_>>(),
        [
            "/opt",
            "/opt/t",
            "/opt/t/script",
            "/opt/t/sub",
            "/opt/t/sub/deeper",
            "/opt/t/sub/deeper/data",
            "/opt/t/sub/link"
        ]
    );
    assert_eq!(
        plan.get("/opt/t/sub/link").unwrap().kind,
        EntryKind::Symlink("../script".into())
    );
    let parsed = parse(&plan.to_cpio().unwrap());
    check_order(&parsed);
    assert_eq!(find(&parsed, "opt/t/sub/deeper/data").3, b"data");

    // A socket named directly is an error.
    let spec = AddSpec::parse(root.join("sock").to_str().unwrap()).unwrap();
    let err = InitramfsPlan::new()
        .add(&spec, &LibrarySearch::host())
        .unwrap_err();
    assert!(
        matches!(err, InitramfsError::AddNotFileOrDir { .. }),
        "{err}"
    );
}

#[test]
fn search_paths_and_ld_so_conf() {
    let got = expand_search_path(
        &["$ORIGIN/../lib:/opt/x:rel:${ORIGIN}:$LIB/y".to_string()],
        Path::new("/host/app/bin"),
        "/guest/bin",
    );
    assert_eq!(
        got,
        [
            (
                PathBuf::from("/host/app/bin/../lib"),
                "/guest/lib".to_string()
            ),
            (PathBuf::from("/opt/x"), "/opt/x".to_string()),
            (PathBuf::from("/host/app/bin"), "/guest/bin".to_string()),
        ]
    );

    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    fs::create_dir(d.join("conf.d")).unwrap();
    fs::write(d.join("conf.d/b.conf"), "/b1\n# /no\n/b2:/b3\n").unwrap();
    fs::write(
        d.join("conf.d/a.conf"),
        "/a1 # comment\ninclude /nonexistent/*.conf\n",
    )
    .unwrap();
    fs::write(d.join("conf.d/skip.txt"), "/skipped\n").unwrap();
    fs::write(
        d.join("ld.so.conf"),
        "/first/\ninclude conf.d/*.conf\nrelative\n/a1\n",
    )
    .unwrap();
    let s = LibrarySearch::from_ld_so_conf(&d.join("ld.so.conf"));
    let want: Vec<PathBuf> = ["/first", "/a1", "/b1", "/b2", "/b3"]
        .iter()
        .map(PathBuf::from)
        .collect();
    assert_eq!(s.conf_dirs, want);
    assert_eq!(s.default_dirs, default_lib_dirs());
    assert!(wildcard_match(b"*.conf", b"x.conf"));
    assert!(!wildcard_match(b"*.conf", b"x.conf~"));
    assert!(wildcard_match(b"a?c*", b"abc"));
}

// ---- the whole ----

#[test]
fn build_writes_everything_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // A base initrd with its own /init, /dev and a file.
    let mut w = CpioWriter::new();
    let m = Meta::default();
    w.dir("dev", 0o755, m).unwrap();
    w.dir("etc", 0o755, m).unwrap();
    w.file("etc/base", 0o644, b"base", m).unwrap();
    w.file("etc/replaced", 0o644, b"base", m).unwrap();
    w.file("init", 0o755, b"their init", m).unwrap();
    let base = d.join("base.img");
    fs::write(&base, gzip(&w.finish().unwrap())).unwrap();
    // A module and an --add file.
    let module = d.join("virtio_console.ko");
    fs::write(&module, "module").unwrap();
    let added = d.join("replaced");
    fs::write(&added, "added").unwrap();
    let init_add = d.join("fake-init");
    fs::write(&init_add, "not our init").unwrap();

    let spec = Spec {
        modules: vec!["/lib/modules/6.1/kernel/virtio_console.ko".into()],
        argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo hi".to_vec()],
        verbose: true,
        ..Default::default()
    };
    let modules = vec![(module.clone(), spec.modules[0].clone())];
    let adds = vec![
        AddSpec::parse(&format!("{}:/etc/replaced", added.display())).unwrap(),
        AddSpec::parse(&format!("{}:/init", init_add.display())).unwrap(),
    ];
    let archive = build(b"\x7fELF our init", &spec, Some(&base), &modules, &adds).unwrap();
    let parsed = parse(&archive);
    check_order(&parsed);

    let init = find(&parsed, "init");
    assert_eq!(
        (init.1, init.3.as_slice()),
        (S_IFREG | 0o755, &b"\x7fELF our init"[..])
    );
    let spec_entry = find(&parsed, &run_protocol::SPEC_PATH[1..]);
    assert_eq!(spec_entry.3, spec.encode());
    assert_eq!(find(&parsed, ".minivmm").1, S_IFDIR | 0o755);
    let console = find(&parsed, "dev/console");
    assert_eq!((console.1, console.2), (S_IFCHR | 0o600, (5, 1)));
    for (dir, mode) in STANDARD_DIRS {
        assert_eq!(find(&parsed, &dir[1..]).1, S_IFDIR | mode, "{dir}");
    }
    assert_eq!(find(&parsed, "etc/base").3, b"base");
    assert_eq!(
        find(&parsed, "etc/replaced").3,
        b"added",
        "--add wins over the base"
    );
    assert_eq!(
        find(&parsed, "lib/modules/6.1/kernel/virtio_console.ko").3,
        b"module"
    );
    assert_eq!(
        find(&parsed, "lib/modules/6.1/kernel/virtio_console.ko").1,
        S_IFREG | 0o644
    );

    if let Some(listed) = cpio_tool(&archive, true) {
        assert_eq!(listed.len(), parsed.len() - 1);
        let console = listed.iter().find(|l| l.ends_with(" dev/console")).unwrap();
        assert!(console.starts_with("crw-------"), "{console}");
    }

    // No base initrd: the same, less its files.
    let archive = build(b"init", &spec, None, &[], &[]).unwrap();
    let parsed = parse(&archive);
    check_order(&parsed);
    let names: Vec<&str> = parsed.iter().map(|p| p.0.as_str()).collect();
    assert_eq!(
        names,
        [
            ".minivmm",
            ".minivmm/run",
            "dev",
            "dev/console",
            "init",
            "proc",
            "root",
            "run",
            "sys",
            "tmp",
            "TRAILER!!!"
        ]
    );
}

#[test]
fn error_messages_do_not_repeat_their_source() {
    use std::error::Error as _;
    let errors = [
        InitramfsError::Read {
            path: "/p".into(),
            source: io::Error::other("SOURCE TEXT"),
        },
        InitramfsError::InitrdDecompress {
            path: "/p".into(),
            offset: 3,
            compression: "gzip",
            source: io::Error::other("SOURCE TEXT"),
        },
        InitramfsError::InterpreterMissing {
            binary: "/b".into(),
            interpreter: "/i".into(),
            source: io::Error::other("SOURCE TEXT"),
        },
    ];
    for e in errors {
        assert!(!e.to_string().contains("SOURCE TEXT"), "{e}");
        assert!(e.source().is_some());
        assert!(e.to_string().contains('/'), "names the path: {e}");
    }
}
