//! Tests of the initramfs: the plan, the archive, initrds, modules, libraries.

#![allow(clippy::unwrap_used)]

use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use super::*;

/// The test images of the repository (built by resources/, not always
/// there).
fn images() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images")
}

fn image(name: &str) -> Option<PathBuf> {
    let p = images().join(name);
    if p.exists() {
        Some(p)
    } else {
        eprintln!(
            "SKIPPED: {} is missing (build the test images)",
            p.display()
        );
        None
    }
}

/// One parsed archive entry: name, mode, rdev, data.
type Parsed = (String, u32, (u32, u32), Vec<u8>);

/// Every entry of an archive, with the cpio crate's reader; the trailer
/// last, nothing after it.
fn parse(archive: &[u8]) -> Vec<Parsed> {
    let mut out = Vec::new();
    let mut rest = archive;
    loop {
        let mut r = newc::Reader::new(rest).unwrap();
        let e = r.entry().clone();
        let mut data = Vec::new();
        r.read_to_end(&mut data).unwrap();
        rest = r.finish().unwrap();
        out.push((
            e.name().to_string(),
            e.mode(),
            (e.rdev_major(), e.rdev_minor()),
            data,
        ));
        if e.is_trailer() {
            break;
        }
    }
    assert!(rest.is_empty(), "{} bytes after the trailer", rest.len());
    out
}

fn find<'a>(parsed: &'a [Parsed], name: &str) -> &'a Parsed {
    parsed
        .iter()
        .find(|p| p.0 == name)
        .unwrap_or_else(|| panic!("no {name} in the archive"))
}

/// What `cpio -it` (`-itv` if `verbose`) lists of `archive`, or `None` if
/// the tool is not installed.
fn cpio_tool(archive: &[u8], verbose: bool) -> Option<Vec<String>> {
    let tool = Path::new("/usr/bin/cpio");
    if !tool.exists() {
        eprintln!("SKIPPED: /usr/bin/cpio is not installed; archive not checked with it");
        return None;
    }
    let mut child = Command::new(tool)
        .arg(if verbose { "-itv" } else { "-it" })
        .arg("--quiet")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = archive.to_vec();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(
        out.status.success(),
        "cpio -it: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Some(
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_string)
            .collect(),
    )
}

/// Checks the archive rules: names unique, each parent directory before
/// what is in it, the trailer last.
fn check_order(parsed: &[Parsed]) {
    let mut seen: HashSet<&str> = HashSet::new();
    let mut dirs: HashSet<&str> = HashSet::new();
    let (last, entries) = parsed.split_last().unwrap();
    assert_eq!(last.0, "TRAILER!!!");
    for (name, mode, _, _) in entries {
        assert!(seen.insert(name), "{name} twice");
        if let Some((parent, _)) = name.rsplit_once('/') {
            assert!(dirs.contains(parent), "{name} before its directory");
        }
        if mode & S_IFMT == S_IFDIR {
            dirs.insert(name);
        }
    }
}

fn gzip(data: &[u8]) -> Vec<u8> {
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn sample_archive() -> Vec<u8> {
    let mut w = CpioWriter::new();
    let m = Meta::default();
    w.dir("etc", 0o755, m).unwrap();
    w.file("etc/hello", 0o640, b"hello\n", m).unwrap();
    w.file("init", 0o755, b"#!/bin/sh\necho theirs\n", m)
        .unwrap();
    w.symlink("etc/link", "hello", m).unwrap();
    w.finish().unwrap()
}

// ---- the cpio writer ----

#[test]
fn cpio_writer_round_trip() {
    let mut w = CpioWriter::new();
    let m = Meta {
        uid: 1,
        gid: 2,
        mtime: 3,
    };
    w.dir("etc", 0o755, m).unwrap();
    w.file("etc/hello", 0o640, b"hello\n", m).unwrap();
    w.file("etc/empty", 0o600, b"", m).unwrap();
    w.file("etc/odd", 0o4755, b"abcde", m).unwrap();
    w.symlink("etc/link", "hello", m).unwrap();
    w.dir("dev", 0o755, m).unwrap();
    w.device("dev/console", false, 0o600, (5, 1), m).unwrap();
    w.device("dev/vda", true, 0o660, (254, 0), m).unwrap();
    w.fifo("dev/pipe", 0o644, m).unwrap();
    let archive = w.finish().unwrap();
    assert_eq!(archive.len() % 4, 0);

    let parsed = parse(&archive);
    check_order(&parsed);
    let want: Vec<Parsed> = vec![
        ("etc".into(), S_IFDIR | 0o755, (0, 0), vec![]),
        (
            "etc/hello".into(),
            S_IFREG | 0o640,
            (0, 0),
            b"hello\n".to_vec(),
        ),
        ("etc/empty".into(), S_IFREG | 0o600, (0, 0), vec![]),
        (
            "etc/odd".into(),
            S_IFREG | 0o4755,
            (0, 0),
            b"abcde".to_vec(),
        ),
        (
            "etc/link".into(),
            S_IFLNK | 0o777,
            (0, 0),
            b"hello".to_vec(),
        ),
        ("dev".into(), S_IFDIR | 0o755, (0, 0), vec![]),
        ("dev/console".into(), S_IFCHR | 0o600, (5, 1), vec![]),
        ("dev/vda".into(), S_IFBLK | 0o660, (254, 0), vec![]),
        ("dev/pipe".into(), S_IFIFO | 0o644, (0, 0), vec![]),
        ("TRAILER!!!".into(), 0, (0, 0), vec![]),
    ];
    assert_eq!(parsed, want);
    let mut r = newc::Reader::new(&archive[..]).unwrap();
    r = newc::Reader::new(r.finish().unwrap()).unwrap();
    assert_eq!(
        (r.entry().uid(), r.entry().gid(), r.entry().mtime()),
        (1, 2, 3)
    );

    if let Some(listed) = cpio_tool(&archive, false) {
        let names: Vec<&str> = want[..want.len() - 1]
            .iter()
            .map(|p| p.0.as_str())
            .collect();
        assert_eq!(listed, names);
    }
    if let Some(listed) = cpio_tool(&archive, true) {
        let console = listed.iter().find(|l| l.ends_with("dev/console")).unwrap();
        assert!(console.starts_with("crw-------"), "{console}");
        assert!(console.contains("5,"), "{console}");
        let link = listed.iter().find(|l| l.contains("etc/link")).unwrap();
        assert!(
            link.starts_with('l') && link.ends_with("etc/link -> hello"),
            "{link}"
        );
    }
}

#[test]
fn cpio_writer_keeps_the_archive_rules() {
    let m = Meta::default();
    let mut w = CpioWriter::new();
    w.dir("a", 0o755, m).unwrap();
    let dup = w.file("a", 0o644, b"x", m).unwrap_err();
    assert!(matches!(dup, InitramfsError::BadEntry { .. }), "{dup}");
    let orphan = w.file("b/c", 0o644, b"x", m).unwrap_err();
    assert!(orphan.to_string().contains("parent directory"), "{orphan}");
    // A file is no parent.
    w.file("a/f", 0o644, b"x", m).unwrap();
    assert!(w.file("a/f/g", 0o644, b"x", m).is_err());
    for bad in ["", "/abs", "a//b", "a/../b", "TRAILER!!!"] {
        assert!(w.file(bad, 0o644, b"", m).is_err(), "{bad:?} taken");
    }
}

// ---- the plan ----

#[test]
fn normalize_paths() {
    assert_eq!(normalize_guest_path(""), "/");
    assert_eq!(normalize_guest_path("/"), "/");
    assert_eq!(normalize_guest_path("./bin//sh/"), "/bin/sh");
    assert_eq!(normalize_guest_path("/a/./b/../c"), "/a/c");
    assert_eq!(normalize_guest_path("/../../x"), "/x");
}

#[test]
fn plan_makes_parents_and_writes_them_first() {
    let mut plan = InitramfsPlan::new();
    plan.add_file("/z/y/x/file", 0o644, b"1".to_vec(), Origin::Add)
        .unwrap();
    plan.add_file("/a b", 0o644, b"2".to_vec(), Origin::Add)
        .unwrap();
    plan.add_file("/a/b", 0o644, b"3".to_vec(), Origin::Add)
        .unwrap();
    plan.add_file("/a-b", 0o644, b"4".to_vec(), Origin::Add)
        .unwrap();
    for dir in ["/z", "/z/y", "/z/y/x", "/a"] {
        assert_eq!(plan.get(dir).unwrap().kind, EntryKind::Dir, "{dir}");
        assert_eq!(plan.get(dir).unwrap().mode, 0o755);
    }
    let archive = plan.to_cpio().unwrap();
    let parsed = parse(&archive);
    check_order(&parsed);
    assert_eq!(find(&parsed, "z/y/x/file").3, b"1");
    assert_eq!(find(&parsed, "a/b").3, b"3");
    if let Some(listed) = cpio_tool(&archive, false) {
        assert_eq!(listed.len(), parsed.len() - 1);
    }
}

#[test]
fn plan_later_entries_replace_earlier_ones() {
    let mut plan = InitramfsPlan::new();
    plan.add_file("/etc/x", 0o644, b"old".to_vec(), Origin::Base)
        .unwrap();
    plan.add_file("/etc/x", 0o600, b"new".to_vec(), Origin::Add)
        .unwrap();
    let e = plan.get("/etc/x").unwrap();
    assert_eq!(e.kind, EntryKind::File(Contents::Bytes(b"new".to_vec())));
    assert_eq!(e.mode, 0o600);

    // A directory onto a directory keeps its contents (and takes the mode).
    plan.add_dir("/etc", 0o700, Origin::Add).unwrap();
    assert_eq!(plan.get("/etc").unwrap().mode, 0o700);
    assert!(plan.get("/etc/x").is_some());

    // A file onto a directory drops the directory's contents.
    plan.add_file("/etcetera", 0o644, vec![], Origin::Base)
        .unwrap();
    plan.add_file("/etc", 0o644, b"f".to_vec(), Origin::Add)
        .unwrap();
    assert!(plan.get("/etc/x").is_none());
    assert!(plan.get("/etcetera").is_some());

    // A file in the way of a directory is replaced by one.
    plan.add_file("/etc/y", 0o644, vec![], Origin::Add).unwrap();
    assert_eq!(plan.get("/etc").unwrap().kind, EntryKind::Dir);

    // A library found for an --add file does not replace an --add file.
    plan.add_file("/lib/libc.so.6", 0o755, b"mine".to_vec(), Origin::Add)
        .unwrap();
    plan.add_file(
        "/lib/libc.so.6",
        0o755,
        b"host".to_vec(),
        Origin::Dependency,
    )
    .unwrap();
    assert_eq!(
        plan.get("/lib/libc.so.6").unwrap().kind,
        EntryKind::File(Contents::Bytes(b"mine".to_vec()))
    );
    check_order(&parse(&plan.to_cpio().unwrap()));
}

#[test]
fn plan_follows_symlinked_parents() {
    let mut plan = InitramfsPlan::new();
    plan.add_dir("/usr/lib", 0o755, Origin::Base).unwrap();
    plan.add_symlink("/lib", "usr/lib", Origin::Base).unwrap();
    plan.add_symlink("/lib64", "/usr/lib64", Origin::Base)
        .unwrap();
    let at = plan
        .add_file(
            "/lib/x86_64-linux-gnu/libc.so.6",
            0o755,
            b"c".to_vec(),
            Origin::Dependency,
        )
        .unwrap();
    assert_eq!(at, "/usr/lib/x86_64-linux-gnu/libc.so.6");
    assert!(plan.get("/lib/x86_64-linux-gnu/libc.so.6").is_none());
    assert_eq!(
        plan.get("/lib").unwrap().kind,
        EntryKind::Symlink("usr/lib".into())
    );
    // The target of a link is made if missing.
    let at = plan
        .add_file("/lib64/ld.so", 0o755, vec![], Origin::Dependency)
        .unwrap();
    assert_eq!(at, "/usr/lib64/ld.so");
    // A directory onto a link goes where it points.
    let at = plan.add_dir("/lib", 0o700, Origin::Add).unwrap();
    assert_eq!(at, "/usr/lib");
    assert!(matches!(
        plan.get("/lib").unwrap().kind,
        EntryKind::Symlink(_)
    ));
    // Links through links, with `..`.
    plan.add_symlink("/usr/lib/up", "../share", Origin::Base)
        .unwrap();
    let at = plan
        .add_file("/lib/up/doc", 0o644, vec![], Origin::Add)
        .unwrap();
    assert_eq!(at, "/usr/share/doc");
    check_order(&parse(&plan.to_cpio().unwrap()));

    // Loops are an error, not a hang.
    plan.add_symlink("/a", "b", Origin::Base).unwrap();
    plan.add_symlink("/b", "/a", Origin::Base).unwrap();
    let err = plan
        .add_file("/a/x", 0o644, vec![], Origin::Add)
        .unwrap_err();
    assert!(matches!(err, InitramfsError::SymlinkLoop { .. }), "{err}");
}

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
