//! Tests of what goes into the initramfs: initrds, the kernel version, modules.

use super::*;

// ---- reading an initrd ----

#[test]
fn initrd_gzip_with_uncompressed_prefix() {
    // An early (microcode) archive, padding, then a gzip'd main archive.
    let mut early = CpioWriter::new();
    let m = Meta::default();
    early.dir("kernel", 0o755, m).unwrap();
    early.file("kernel/ucode.bin", 0o644, b"ucode", m).unwrap();
    let mut data = early.finish().unwrap();
    data.resize(data.len().next_multiple_of(512), 0);
    data.extend(gzip(&sample_archive()));
    data.extend([0u8; 16]);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("initrd.img");
    fs::write(&path, &data).unwrap();

    let entries = read_initrd(&path).unwrap();
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names,
        [
            "/kernel",
            "/kernel/ucode.bin",
            "/etc",
            "/etc/hello",
            "/init",
            "/etc/link"
        ]
    );
    let mut plan = InitramfsPlan::new();
    assert_eq!(plan.add_initrd(&path).unwrap(), 5);
    assert!(plan.get("/init").is_none(), "their /init is kept out");
    let hello = plan.get("/etc/hello").unwrap();
    assert_eq!(
        hello.kind,
        EntryKind::File(Contents::Bytes(b"hello\n".to_vec()))
    );
    assert_eq!((hello.mode, hello.origin), (0o640, Origin::Base));
    assert_eq!(
        plan.get("/etc/link").unwrap().kind,
        EntryKind::Symlink("hello".into())
    );
    assert!(plan.get("/kernel/ucode.bin").is_some());
}

#[test]
fn initrd_concatenated_gzip_zstd_xz_and_names() {
    let mut w = CpioWriter::new();
    let m = Meta::default();
    w.dir("a", 0o755, m).unwrap();
    w.file("a/one", 0o644, b"1", m).unwrap();
    let one = w.finish().unwrap();
    let mut w = CpioWriter::new();
    w.file("two", 0o644, b"2", m).unwrap();
    let two = w.finish().unwrap();
    let mut w = CpioWriter::new();
    w.file("three", 0o644, b"3", m).unwrap();
    let three = w.finish().unwrap();

    let mut data = gzip(&one);
    data.extend(ruzstd::encoding::compress_to_vec(
        &two[..],
        ruzstd::encoding::CompressionLevel::Fastest,
    ));
    let mut xz = Vec::new();
    lzma_rs::xz_compress(&mut &three[..], &mut xz).unwrap();
    data.extend(xz);
    data.extend([0u8; 4]);
    let entries = parse_initrd(&data, Path::new("test.img")).unwrap();
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["/a", "/a/one", "/two", "/three"]);

    // One archive split across gzip members, and across zstd frames.
    let sample = sample_archive();
    let (head, tail) = sample.split_at(150);
    let want: Vec<String> = parse_initrd(&sample, Path::new("t"))
        .unwrap()
        .into_iter()
        .map(|(n, _)| n)
        .collect();
    assert_eq!(want, ["/etc", "/etc/hello", "/init", "/etc/link"]);
    let zstd = |d: &[u8]| {
        ruzstd::encoding::compress_to_vec(d, ruzstd::encoding::CompressionLevel::Fastest)
    };
    for split in [
        [gzip(head), gzip(tail)].concat(),
        [zstd(head), zstd(tail)].concat(),
    ] {
        let got: Vec<String> = parse_initrd(&split, Path::new("t"))
            .unwrap()
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        assert_eq!(got, want);
    }

    // Names as other tools write them: "./x", "/x", and the "." entry.
    let mut raw = Vec::new();
    for (name, mode) in [
        (".", S_IFDIR | 0o755),
        ("./bin", S_IFDIR | 0o755),
        ("/bin/x", S_IFREG | 0o644),
    ] {
        raw = newc::Builder::new(name)
            .mode(mode)
            .write(raw, 0)
            .finish()
            .unwrap();
    }
    let raw = newc::trailer(raw).unwrap();
    let entries = parse_initrd(&raw, Path::new("t")).unwrap();
    let names: Vec<&str> = entries.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names, ["/bin", "/bin/x"]);
}

#[test]
fn initrd_hard_links_share_their_data() {
    // As GNU cpio writes them: the data with the last link.
    let mut raw = Vec::new();
    let mut b = newc::Builder::new("a")
        .mode(S_IFREG | 0o755)
        .ino(7)
        .nlink(2)
        .write(raw, 0);
    b.write_all(b"").unwrap();
    raw = b.finish().unwrap();
    let mut b = newc::Builder::new("b")
        .mode(S_IFREG | 0o755)
        .ino(7)
        .nlink(2)
        .write(raw, 4);
    b.write_all(b"data").unwrap();
    raw = b.finish().unwrap();
    let raw = newc::trailer(raw).unwrap();
    let entries = parse_initrd(&raw, Path::new("t")).unwrap();
    for (name, e) in &entries {
        assert_eq!(
            e.kind,
            EntryKind::File(Contents::Bytes(b"data".to_vec())),
            "{name}"
        );
    }
}

#[test]
fn initrd_errors_name_the_problem() {
    let p = Path::new("/x/initrd.img");
    let err = parse_initrd(&[0x02, 0x21, 0x4c, 0x18, 1, 2, 3], p).unwrap_err();
    let msg = err.to_string();
    assert!(
        msg.contains("lz4") && msg.contains("/x/initrd.img"),
        "{msg}"
    );
    let err = parse_initrd(b"BZh91AY", p).unwrap_err();
    assert!(err.to_string().contains("bzip2"), "{err}");
    let err = parse_initrd(b"hello world", p).unwrap_err();
    assert!(matches!(err, InitramfsError::InitrdFormat { .. }), "{err}");
    assert!(err.to_string().contains("byte 0"), "{err}");
    // A truncated archive.
    let archive = sample_archive();
    let err = parse_initrd(&archive[..150], p).unwrap_err();
    assert!(matches!(err, InitramfsError::InitrdFormat { .. }), "{err}");
    // Damaged gzip data.
    let mut gz = gzip(&archive);
    gz.truncate(gz.len() / 2);
    let err = parse_initrd(&gz, p).unwrap_err();
    assert!(
        matches!(
            err,
            InitramfsError::InitrdDecompress {
                compression: "gzip",
                ..
            }
        ),
        "{err}"
    );
    // Gzip'd data that is no cpio archive.
    let err = parse_initrd(&gzip(b"not cpio"), p).unwrap_err();
    assert!(
        err.to_string().contains("of the gzip data at byte 0"),
        "{err}"
    );
    // Missing file.
    let err = read_initrd(Path::new("/nonexistent/initrd")).unwrap_err();
    assert!(err.to_string().contains("/nonexistent/initrd"), "{err}");
}

#[test]
fn initrd_of_the_test_images() {
    let Some(path) = image("initrd.img") else {
        return;
    };
    let entries = read_initrd(&path).unwrap();
    assert!(entries.len() > 100, "{} entries", entries.len());
    assert!(entries.iter().any(|(n, _)| n == "/bin/busybox"));
    let mut plan = InitramfsPlan::new();
    let n = plan.add_initrd(&path).unwrap();
    assert_eq!(n, entries.len() - 1, "all but /init");
    assert!(plan.get("/init").is_none());
    let archive = plan.to_cpio().unwrap();
    let parsed = parse(&archive);
    check_order(&parsed);
    if let Some(listed) = cpio_tool(&archive, false) {
        assert_eq!(listed.len(), parsed.len() - 1);
    }
}

// ---- kernel version ----

#[test]
fn kernel_version_synthetic() {
    let mut bz = vec![0u8; 0x1000];
    bz[0x202..0x206].copy_from_slice(b"HdrS");
    bz[0x20e..0x210].copy_from_slice(&0x0300u16.to_le_bytes());
    let s = b"6.1.0-57-cloud-amd64 (debian-kernel@lists.debian.org) #1 SMP\0";
    bz[0x500..0x500 + s.len()].copy_from_slice(s);
    assert_eq!(kernel_version(&bz).as_deref(), Some("6.1.0-57-cloud-amd64"));

    // No pointer in the header, no banner: nothing.
    bz[0x20e..0x210].copy_from_slice(&[0, 0]);
    assert_eq!(kernel_version(&bz), None);

    let mut elf =
        b"\x7fELF....Linux version %s\0....Linux version 6.12.0-rc1+ (me@host) #2\0".to_vec();
    assert_eq!(kernel_version(&elf).as_deref(), Some("6.12.0-rc1+"));
    elf.truncate(30);
    assert_eq!(kernel_version(&elf), None);
    assert_eq!(kernel_version(b""), None);
}

#[test]
fn kernel_version_of_the_test_images() {
    let Some(versions) = image("versions") else {
        return;
    };
    let versions = fs::read_to_string(versions).unwrap();
    let want = versions
        .lines()
        .find_map(|l| l.strip_prefix("cloud="))
        .unwrap()
        .trim();
    for name in ["vmlinuz", "vmlinux"] {
        if let Some(path) = image(name) {
            assert_eq!(kernel_version_of(&path).unwrap(), want, "{name}");
        }
    }
    let err = kernel_version_of(&images().join("versions")).unwrap_err();
    assert!(err.to_string().contains("--modules DIR"), "{err}");
}

// ---- modules ----

/// A modules tree: `a` needs `b` and `c`, `c` needs `b`; `d-e` is xz'd;
/// `virtio_mmio` is built in; `gone` is listed but missing.
fn modules_tree() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let k = dir.path().join("kernel/drivers");
    fs::create_dir_all(&k).unwrap();
    for f in ["a.ko", "b.ko", "c.ko", "d-e.ko.xz", "needs_gone.ko"] {
        fs::write(k.join(f), f).unwrap();
    }
    fs::write(
        dir.path().join("modules.dep"),
        "kernel/drivers/a.ko: kernel/drivers/c.ko kernel/drivers/b.ko\n\
         kernel/drivers/b.ko:\n\
         kernel/drivers/c.ko: kernel/drivers/b.ko\n\
         kernel/drivers/d-e.ko.xz:\n\
         kernel/drivers/needs_gone.ko: kernel/drivers/gone.ko\n\
         kernel/drivers/gone.ko:\n",
    )
    .unwrap();
    fs::write(
        dir.path().join("modules.builtin"),
        "kernel/drivers/virtio/virtio_mmio.ko\n",
    )
    .unwrap();
    dir
}

#[test]
fn modules_in_load_order() {
    let tree = modules_tree();
    let d = tree.path();
    let got =
        resolve_modules(d, "6.1.0-9", &["a", "d_e", "c", "virtio-mmio", "b.ko"], &[]).unwrap();
    let want: Vec<(PathBuf, String)> = ["b.ko", "c.ko", "a.ko", "d-e.ko.xz"]
        .iter()
        .map(|f| {
            (
                d.join("kernel/drivers").join(f),
                format!("/lib/modules/6.1.0-9/kernel/drivers/{f}"),
            )
        })
        .collect();
    assert_eq!(got, want);
    assert_eq!(resolve_modules(d, "v", &["virtio_mmio"], &[]).unwrap(), []);
    // Optional modules: after the needed ones, each once, absent ones left out.
    let got = resolve_modules(d, "v", &["c"], &["absent", "a", "b"]).unwrap();
    let names: Vec<String> = got.iter().map(|(_, g)| module_name(g)).collect();
    assert_eq!(names, ["b", "c", "a"]);
    assert_eq!(module_name("kernel/x/virtio-rng.ko.zst"), "virtio_rng");
    assert_eq!(module_name("virtio_console"), "virtio_console");
    assert_eq!(default_modules_dir("6.1"), Path::new("/lib/modules/6.1"));
}

#[test]
fn modules_errors() {
    let tree = modules_tree();
    let d = tree.path();
    let err = resolve_modules(d, "v", &["nope"], &[]).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, InitramfsError::ModuleNotFound { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("nope") && msg.contains(&d.display().to_string()),
        "{msg}"
    );

    let err = resolve_modules(d, "v", &["needs_gone"], &[]).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, InitramfsError::ModuleFileMissing { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("gone.ko") && msg.contains("needs_gone"),
        "{msg}"
    );

    let missing = d.join("nothing-here");
    let err = resolve_modules(&missing, "6.1.0-9", &["a"], &[]).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, InitramfsError::NoModulesTree { .. }), "{msg}");
    assert!(
        msg.contains("nothing-here/modules.dep")
            && msg.contains("--modules DIR")
            && msg.contains("depmod"),
        "{msg}"
    );
    assert!(
        !msg.contains("No such file"),
        "the source is not repeated: {msg}"
    );

    fs::write(d.join("modules.dep"), "kernel/a.ko: b.ko\nnonsense\n").unwrap();
    let err = resolve_modules(d, "v", &["a"], &[]).unwrap_err();
    assert!(err.to_string().contains("line 2"), "{err}");
}

#[test]
fn modules_of_the_test_kernel() {
    let Some(versions) = image("versions") else {
        return;
    };
    let versions = fs::read_to_string(versions).unwrap();
    let version = versions
        .lines()
        .find_map(|l| l.strip_prefix("cloud="))
        .unwrap()
        .trim();
    let dir = images().join("work/cloud/lib/modules").join(version);
    if !dir.join("modules.dep").exists() {
        eprintln!(
            "SKIPPED: no modules.dep in {} (run depmod -b)",
            dir.display()
        );
        return;
    }
    let got = resolve_modules(&dir, version, &["virtio_mmio", "virtio-console"], &[]).unwrap();
    let names: Vec<String> = got.iter().map(|(_, g)| module_name(g)).collect();
    assert_eq!(names.last().map(String::as_str), Some("virtio_console"));
    let pos = |n: &str| names.iter().position(|x| x == n).unwrap();
    assert!(
        pos("virtio") < pos("virtio_mmio") && pos("virtio_ring") < pos("virtio_mmio"),
        "{names:?}"
    );
    assert_eq!(names.len(), names.iter().collect::<HashSet<_>>().len());
    for (host, guest) in &got {
        assert!(host.is_file());
        assert!(guest.starts_with(&format!("/lib/modules/{version}/kernel/")));
    }
}
