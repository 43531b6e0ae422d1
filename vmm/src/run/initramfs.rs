//! The initramfs of `minivmm run`, made in process (no cpio or other tool at
//! run time): one uncompressed newc cpio archive holding, in this order of
//! precedence (a later entry replaces an earlier one at the same path),
//!
//! 1. the files of `--initrd IMG` (newc cpio, plain or gzip, zstd or xz
//!    compressed, possibly several archives one after the other), less its
//!    `/init`;
//! 2. the standard directories and `/dev/console` (5:1, which the kernel opens
//!    for the init's stdin, stdout and stderr);
//! 3. the kernel modules the run needs ([`resolve_modules`]), at
//!    `/lib/modules/VERSION/...`;
//! 4. the files of each `--add HOST[:GUEST]` ([`AddSpec`]), with the program
//!    interpreter and shared libraries of each dynamically linked ELF file, at
//!    the paths where the host's loader finds them;
//! 5. minivmm's init at `/init` and the run spec at [`run_protocol::SPEC_PATH`].
//!
//! [`build`] does it all; [`InitramfsPlan`] is the set of entries it writes and
//! [`CpioWriter`] the archive writer. [`kernel_version`] reads the version of a
//! kernel image (for the default modules tree, `/lib/modules/VERSION`).

use std::borrow::Cow;
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use cpio::newc;
use object::elf;
use object::read::elf::{Dyn as _, FileHeader, ProgramHeader as _};
use object::read::StringTable;
use object::{Endianness, FileKind};
use run_protocol::Spec;

const S_IFMT: u32 = 0o170_000;
const S_IFSOCK: u32 = 0o140_000;
const S_IFLNK: u32 = 0o120_000;
const S_IFREG: u32 = 0o100_000;
const S_IFBLK: u32 = 0o060_000;
const S_IFDIR: u32 = 0o040_000;
const S_IFCHR: u32 = 0o020_000;
const S_IFIFO: u32 = 0o010_000;

/// How many symbolic links a path may go through (as the kernel's limit).
const MAX_SYMLINKS: u32 = 40;

/// The directories every initramfs of `minivmm run` has, with their modes.
pub const STANDARD_DIRS: &[(&str, u32)] = &[
    ("/dev", 0o755),
    ("/proc", 0o555),
    ("/sys", 0o555),
    ("/tmp", 0o1777),
    ("/run", 0o755),
    ("/root", 0o700),
    ("/.minivmm", 0o755),
];

/// Where the init is.
pub const INIT_PATH: &str = "/init";

/// The console device: the kernel opens it for the init's stdin, stdout and
/// stderr, and finds it only in the initramfs (devtmpfs is not mounted yet).
pub const CONSOLE_PATH: &str = "/dev/console";
const CONSOLE_MAJOR: u32 = 5;
const CONSOLE_MINOR: u32 = 1;

/// What can go wrong making the initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// A host file or directory could not be read.
    #[error("cannot read {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The HOST of an `--add` is not there.
    #[error("--add {spec}: {} is not there on the host (or cannot be reached); give an existing file or directory", .host.display())]
    AddMissing {
        /// The `--add` argument.
        spec: String,
        /// Its HOST.
        host: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The GUEST of an `--add` is not an absolute path.
    #[error("--add {spec}: the guest path {guest:?} is not absolute; write it from the root, as HOST:/PATH")]
    AddRelativeGuest {
        /// The `--add` argument.
        spec: String,
        /// Its GUEST.
        guest: String,
    },
    /// The HOST of an `--add` is a socket, a fifo or a device.
    #[error("--add: {} is neither a regular file nor a directory; add a file or the directory that holds it", .host.display())]
    AddNotFileOrDir {
        /// Its HOST.
        host: PathBuf,
    },
    /// A path that is to be a name in the archive is not UTF-8.
    #[error("{} is not valid UTF-8, which names in the initramfs must be; rename it, or add it under another guest path", .path.display())]
    NotUtf8 {
        /// The path.
        path: PathBuf,
    },
    /// A shared library an ELF file needs is nowhere the loader looks.
    #[error("{} needs the shared library {library}, which is in none of {}; install it on the host, or list the directory holding it in /etc/ld.so.conf", .binary.display(), list_dirs(.searched))]
    LibraryNotFound {
        /// The library, as the ELF file names it (`DT_NEEDED`).
        library: String,
        /// The ELF file that needs it.
        binary: PathBuf,
        /// The host directories searched.
        searched: Vec<PathBuf>,
    },
    /// The program interpreter (`PT_INTERP`) of an ELF file is missing.
    #[error("{} is run by the program interpreter {}, which cannot be read on the host; install it (the C library's loader) or add a statically linked program", .binary.display(), .interpreter.display())]
    InterpreterMissing {
        /// The ELF file.
        binary: PathBuf,
        /// Its interpreter.
        interpreter: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The modules tree or its `modules.dep` is missing.
    #[error("no kernel modules tree for kernel {version} at {}: cannot read {}; pass --modules DIR with the modules of that kernel, or run `depmod {version}` to write modules.dep", .dir.display(), .dir.join("modules.dep").display())]
    NoModulesTree {
        /// The tree.
        dir: PathBuf,
        /// The kernel version.
        version: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A line of `modules.dep` is not `MODULE: DEPENDENCY...`.
    #[error("{}, line {line}: not a modules.dep line (MODULE: DEPENDENCY...); regenerate the file with depmod", .path.display())]
    BadModulesDep {
        /// The file.
        path: PathBuf,
        /// The line number (from 1).
        line: usize,
    },
    /// No such module in the tree (neither a file nor built in).
    #[error("no kernel module {name} in {} (neither in modules.dep nor in modules.builtin); check the name, or pass --modules DIR with the modules of the kernel", .dir.display())]
    ModuleNotFound {
        /// The module's name.
        name: String,
        /// The tree.
        dir: PathBuf,
    },
    /// A module (or one it depends on) is in `modules.dep` but not on disk.
    #[error("kernel module {module} needs {}, which cannot be read; reinstall the kernel's modules or pass --modules DIR with a complete tree", .path.display())]
    ModuleFileMissing {
        /// The module asked for.
        module: String,
        /// The missing file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The kernel image holds no version string minivmm can find.
    #[error("cannot tell the version of the kernel {}: it is neither a bzImage with a version in its setup header nor an image holding a \"Linux version\" string; pass --modules DIR", .path.display())]
    NoKernelVersion {
        /// The image.
        path: PathBuf,
    },
    /// The initrd is not a newc cpio archive (or is damaged).
    #[error("{} is not a newc cpio initramfs: {what} at {location}; give a newc cpio archive, plain or compressed with gzip, zstd or xz", .path.display())]
    InitrdFormat {
        /// The initrd.
        path: PathBuf,
        /// Where in it.
        location: String,
        /// What is wrong there.
        what: String,
    },
    /// The initrd is compressed with something minivmm cannot read.
    #[error("{} holds {compression} compressed data at byte {offset}, which minivmm cannot read; recompress the initrd with gzip, zstd or xz (or leave it uncompressed)", .path.display())]
    InitrdCompression {
        /// The initrd.
        path: PathBuf,
        /// Where in it.
        offset: u64,
        /// The compression.
        compression: &'static str,
    },
    /// Compressed data of the initrd did not decompress.
    #[error("cannot decompress the {compression} data at byte {offset} of {}; the initrd is damaged or truncated", .path.display())]
    InitrdDecompress {
        /// The initrd.
        path: PathBuf,
        /// Where in it.
        offset: u64,
        /// The compression.
        compression: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// A file is too large for a newc entry.
    #[error("{name} is 4 GiB or larger, more than a newc cpio entry can hold; leave it out of the initramfs")]
    TooLarge {
        /// Its name in the archive (or host path).
        name: String,
    },
    /// Symbolic links in the initramfs loop (or nest too deep).
    #[error("the symbolic links at {path} in the initramfs form a loop or nest more than {MAX_SYMLINKS} deep; fix the links of the --initrd or --add files")]
    SymlinkLoop {
        /// Where.
        path: String,
    },
    /// An entry that would make a broken archive (a bug in minivmm).
    #[error("cannot write {name} into the initramfs: {why} (a bug in minivmm)")]
    BadEntry {
        /// Its name in the archive.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
    /// Writing into the in-memory archive failed.
    #[error("cannot write {name} into the initramfs")]
    Write {
        /// Its name in the archive.
        name: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

fn list_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "the directories searched (none)".to_string();
    }
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}

// ---------------------------------------------------------------------------
// Guest paths
// ---------------------------------------------------------------------------

/// `path` as an absolute guest path with no `.`, `..` or empty components
/// (`..` at the root stays at the root); `/` for the root.
pub fn normalize_guest_path(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    let mut out = String::with_capacity(path.len() + 1);
    for p in &parts {
        out.push('/');
        out.push_str(p);
    }
    if out.is_empty() {
        out.push('/');
    }
    out
}

/// The parent and last component of a normalized path other than `/`.
fn split_path(path: &str) -> (&str, &str) {
    match path.rfind('/') {
        Some(0) => ("/", &path[1..]),
        Some(i) => (&path[..i], &path[i + 1..]),
        None => ("/", path),
    }
}

fn join_path(parent: &str, name: &str) -> String {
    if parent == "/" {
        format!("/{name}")
    } else {
        format!("{parent}/{name}")
    }
}

fn path_str(path: &Path) -> Result<&str, InitramfsError> {
    path.to_str().ok_or_else(|| InitramfsError::NotUtf8 {
        path: path.to_path_buf(),
    })
}

// ---------------------------------------------------------------------------
// The newc cpio writer
// ---------------------------------------------------------------------------

/// Owner and time of an archive entry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Meta {
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time (seconds since the epoch).
    pub mtime: u32,
}

/// Writes a newc cpio archive into memory. Names are written without a
/// leading `/`; each must be new, and its parent directory written before it
/// (else [`InitramfsError::BadEntry`]).
#[derive(Debug, Default)]
pub struct CpioWriter {
    out: Vec<u8>,
    ino: u32,
    names: HashSet<String>,
    dirs: HashSet<String>,
}

impl CpioWriter {
    /// An empty archive.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a directory with permission bits `mode`.
    pub fn dir(&mut self, name: &str, mode: u32, meta: Meta) -> Result<(), InitramfsError> {
        self.entry(name, S_IFDIR | (mode & 0o7777), meta, 2, (0, 0), &[])?;
        self.dirs.insert(name.to_string());
        Ok(())
    }

    /// Adds a regular file with permission bits `mode`.
    pub fn file(
        &mut self,
        name: &str,
        mode: u32,
        data: &[u8],
        meta: Meta,
    ) -> Result<(), InitramfsError> {
        self.entry(name, S_IFREG | (mode & 0o7777), meta, 1, (0, 0), data)
    }

    /// Adds a symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str, meta: Meta) -> Result<(), InitramfsError> {
        self.entry(name, S_IFLNK | 0o777, meta, 1, (0, 0), target.as_bytes())
    }

    /// Adds a character (`block` false) or block device node.
    pub fn device(
        &mut self,
        name: &str,
        block: bool,
        mode: u32,
        (major, minor): (u32, u32),
        meta: Meta,
    ) -> Result<(), InitramfsError> {
        let kind = if block { S_IFBLK } else { S_IFCHR };
        self.entry(name, kind | (mode & 0o7777), meta, 1, (major, minor), &[])
    }

    /// Adds a named pipe.
    pub fn fifo(&mut self, name: &str, mode: u32, meta: Meta) -> Result<(), InitramfsError> {
        self.entry(name, S_IFIFO | (mode & 0o7777), meta, 1, (0, 0), &[])
    }

    /// Ends the archive with its `TRAILER!!!` and returns it.
    pub fn finish(self) -> Result<Vec<u8>, InitramfsError> {
        newc::trailer(self.out).map_err(|source| InitramfsError::Write {
            name: "TRAILER!!!".to_string(),
            source,
        })
    }

    fn entry(
        &mut self,
        name: &str,
        mode: u32,
        meta: Meta,
        nlink: u32,
        (rdev_major, rdev_minor): (u32, u32),
        data: &[u8],
    ) -> Result<(), InitramfsError> {
        let bad = |why| InitramfsError::BadEntry {
            name: name.to_string(),
            why,
        };
        if name.is_empty() || name.starts_with('/') || name.split('/').any(|p| p.is_empty()) {
            return Err(bad("not a relative path without empty components"));
        }
        if name.split('/').any(|p| p == "." || p == "..") || name == "TRAILER!!!" {
            return Err(bad("a reserved name or a name with . or .."));
        }
        if let Some((parent, _)) = name.rsplit_once('/') {
            if !self.dirs.contains(parent) {
                return Err(bad("its parent directory was not written before it"));
            }
        }
        if !self.names.insert(name.to_string()) {
            return Err(bad("it was written already"));
        }
        let size = u32::try_from(data.len()).map_err(|_| InitramfsError::TooLarge {
            name: name.to_string(),
        })?;
        self.ino += 1;
        let mut writer = newc::Builder::new(name)
            .ino(self.ino)
            .mode(mode)
            .uid(meta.uid)
            .gid(meta.gid)
            .nlink(nlink)
            .mtime(meta.mtime)
            .rdev_major(rdev_major)
            .rdev_minor(rdev_minor)
            .write(&mut self.out, size);
        writer
            .write_all(data)
            .and_then(|()| writer.finish().map(drop))
            .map_err(|source| InitramfsError::Write {
                name: name.to_string(),
                source,
            })
    }
}

// ---------------------------------------------------------------------------
// The plan
// ---------------------------------------------------------------------------

/// Where the bytes of a regular file come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Contents {
    /// These bytes.
    Bytes(Vec<u8>),
    /// This host file (read, following symbolic links, when the archive is
    /// written).
    Host(PathBuf),
}

/// What an entry is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    /// A directory.
    Dir,
    /// A regular file.
    File(Contents),
    /// A symbolic link to this target.
    Symlink(String),
    /// A character device.
    CharDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A block device.
    BlockDevice {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// A named pipe.
    Fifo,
}

/// Why an entry is in the initramfs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// From `--initrd`.
    Base,
    /// A standard directory or device, or a directory made for an entry in it.
    Standard,
    /// A kernel module.
    Module,
    /// Named by an `--add` (or in a directory it names).
    Add,
    /// A program interpreter or shared library an `--add` file needs.
    Dependency,
    /// minivmm's init or the run spec.
    Init,
}

/// One entry of the initramfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// What it is.
    pub kind: EntryKind,
    /// Its permission bits (`0o7777` at most).
    pub mode: u32,
    /// Owner and time.
    pub meta: Meta,
    /// Why it is there.
    pub origin: Origin,
}

impl Entry {
    /// An entry owned by root, time 0.
    pub fn new(kind: EntryKind, mode: u32, origin: Origin) -> Self {
        Self {
            kind,
            mode: mode & 0o7777,
            meta: Meta::default(),
            origin,
        }
    }

    /// An entry with the permission bits and time of a host file, owned by root.
    fn from_host(kind: EntryKind, meta: &fs::Metadata, origin: Origin) -> Self {
        let mtime = u32::try_from(meta.mtime().max(0)).unwrap_or(u32::MAX);
        Self {
            kind,
            mode: meta.mode() & 0o7777,
            meta: Meta {
                uid: 0,
                gid: 0,
                mtime,
            },
            origin,
        }
    }
}

/// The entries of an initramfs, by absolute guest path; written in path order,
/// so a directory comes before what is in it.
///
/// [`insert`](Self::insert) works as unpacking an archive over the tree so far
/// would: the entry replaces one at the same path (a directory onto a
/// directory keeps what is in it; a file onto a directory drops the
/// directory's contents; a directory onto a symbolic link goes where the link
/// points); missing parent directories are made (mode 0755), and symbolic
/// links among the parents are followed, so `/lib/x/libc.so.6` over a
/// `/lib -> usr/lib` link becomes `/usr/lib/x/libc.so.6`. One exception: a
/// [`Origin::Dependency`] does not replace an [`Origin::Add`] entry.
#[derive(Debug, Clone, Default)]
pub struct InitramfsPlan {
    entries: BTreeMap<String, Entry>,
    /// Whether a shared library was found through /etc/ld.so.conf only.
    needs_ld_cache: bool,
}

impl InitramfsPlan {
    /// An empty plan.
    pub fn new() -> Self {
        Self::default()
    }

    /// The entry at `path` (no symbolic link followed).
    pub fn get(&self, path: &str) -> Option<&Entry> {
        self.entries.get(&normalize_guest_path(path))
    }

    /// The guest paths, in the order they will be written.
    pub fn paths(&self) -> impl Iterator<Item = &str> {
        self.entries.keys().map(String::as_str)
    }

    /// The entries, in the order they will be written.
    pub fn entries(&self) -> impl Iterator<Item = (&str, &Entry)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// How many entries there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Puts `entry` at `path` (see the type's documentation); returns the path
    /// where it went (symbolic links among its parents followed).
    pub fn insert(&mut self, path: &str, entry: Entry) -> Result<String, InitramfsError> {
        let path = normalize_guest_path(path);
        if path == "/" {
            // The root is always there; its mode is the kernel's.
            return Ok(path);
        }
        let (parent, name) = split_path(&path);
        let parent = self.ensure_dir(parent, 0)?;
        let full = join_path(&parent, name);
        if let Some(old) = self.entries.get(&full) {
            if entry.origin == Origin::Dependency && old.origin == Origin::Add {
                return Ok(full);
            }
            match (&old.kind, &entry.kind) {
                (EntryKind::Symlink(_), EntryKind::Dir) => return self.ensure_dir(&full, 0),
                (EntryKind::Dir, EntryKind::Dir) => {}
                (EntryKind::Dir, _) => self.remove_contents(&full),
                _ => {}
            }
        }
        self.entries.insert(full.clone(), entry);
        Ok(full)
    }

    /// Removes everything under the directory `dir`.
    fn remove_contents(&mut self, dir: &str) {
        let prefix = format!("{dir}/");
        let doomed: Vec<String> = self
            .entries
            .range(prefix.clone()..)
            .take_while(|(k, _)| k.starts_with(&prefix))
            .map(|(k, _)| k.clone())
            .collect();
        for k in doomed {
            self.entries.remove(&k);
        }
    }

    /// Makes `path` (normalized) a directory, following symbolic links and
    /// making what is missing; returns the directory's real path.
    fn ensure_dir(&mut self, path: &str, depth: u32) -> Result<String, InitramfsError> {
        if path == "/" {
            return Ok(path.to_string());
        }
        let (parent, name) = split_path(path);
        let parent = self.ensure_dir(parent, depth)?;
        let full = join_path(&parent, name);
        match self.entries.get(&full).map(|e| &e.kind) {
            Some(EntryKind::Dir) => Ok(full),
            Some(EntryKind::Symlink(target)) => {
                if depth >= MAX_SYMLINKS {
                    return Err(InitramfsError::SymlinkLoop { path: full });
                }
                let target = if target.starts_with('/') {
                    normalize_guest_path(target)
                } else {
                    normalize_guest_path(&format!("{parent}/{target}"))
                };
                self.ensure_dir(&target, depth + 1)
            }
            _ => {
                // Missing, or a file in the way (the later entry wins).
                self.entries.insert(
                    full.clone(),
                    Entry::new(EntryKind::Dir, 0o755, Origin::Standard),
                );
                Ok(full)
            }
        }
    }

    /// Adds a directory.
    pub fn add_dir(
        &mut self,
        path: &str,
        mode: u32,
        origin: Origin,
    ) -> Result<String, InitramfsError> {
        self.insert(path, Entry::new(EntryKind::Dir, mode, origin))
    }

    /// Adds a regular file holding `data`.
    pub fn add_file(
        &mut self,
        path: &str,
        mode: u32,
        data: Vec<u8>,
        origin: Origin,
    ) -> Result<String, InitramfsError> {
        self.insert(
            path,
            Entry::new(EntryKind::File(Contents::Bytes(data)), mode, origin),
        )
    }

    /// Adds a regular file whose bytes are those of the host file `host`.
    pub fn add_host_file(
        &mut self,
        path: &str,
        mode: u32,
        host: &Path,
        origin: Origin,
    ) -> Result<String, InitramfsError> {
        self.insert(
            path,
            Entry::new(
                EntryKind::File(Contents::Host(host.to_path_buf())),
                mode,
                origin,
            ),
        )
    }

    /// Adds a symbolic link.
    pub fn add_symlink(
        &mut self,
        path: &str,
        target: &str,
        origin: Origin,
    ) -> Result<String, InitramfsError> {
        self.insert(
            path,
            Entry::new(EntryKind::Symlink(target.to_string()), 0o777, origin),
        )
    }

    /// Adds the entries of the initrd at `path` ([`read_initrd`]) except its
    /// `/init`; returns how many were added.
    pub fn add_initrd(&mut self, path: &Path) -> Result<usize, InitramfsError> {
        let mut n = 0;
        for (name, entry) in read_initrd(path)? {
            if name == INIT_PATH {
                continue;
            }
            self.insert(&name, entry)?;
            n += 1;
        }
        Ok(n)
    }

    /// Adds the [`STANDARD_DIRS`] where they are missing, and `/dev/console`.
    pub fn add_standard(&mut self) -> Result<(), InitramfsError> {
        for &(dir, mode) in STANDARD_DIRS {
            match self.get(dir).map(|e| &e.kind) {
                Some(EntryKind::Dir | EntryKind::Symlink(_)) => {}
                _ => {
                    self.add_dir(dir, mode, Origin::Standard)?;
                }
            }
        }
        self.insert(
            CONSOLE_PATH,
            Entry::new(
                EntryKind::CharDevice {
                    major: CONSOLE_MAJOR,
                    minor: CONSOLE_MINOR,
                },
                0o600,
                Origin::Standard,
            ),
        )?;
        Ok(())
    }

    /// Adds kernel modules, `(host path, guest path)` as [`resolve_modules`]
    /// returns them.
    pub fn add_modules(&mut self, modules: &[(PathBuf, String)]) -> Result<(), InitramfsError> {
        for (host, guest) in modules {
            self.add_host_file(guest, 0o644, host, Origin::Module)?;
        }
        Ok(())
    }

    /// Adds minivmm's init at `/init` (mode 0755) and the run spec at
    /// [`run_protocol::SPEC_PATH`].
    pub fn add_init(&mut self, init_elf: &[u8], spec: &Spec) -> Result<(), InitramfsError> {
        self.add_file(INIT_PATH, 0o755, init_elf.to_vec(), Origin::Init)?;
        self.add_file(run_protocol::SPEC_PATH, 0o644, spec.encode(), Origin::Init)?;
        Ok(())
    }

    /// Adds what `--add` names: a file with its mode, a directory with all in
    /// it (symbolic links as links; sockets, fifos and devices left out), and
    /// for each dynamically linked ELF file its program interpreter and the
    /// shared libraries it needs, found as the host's loader would with
    /// `search`, each stored as a regular file at the path where it was found.
    pub fn add(&mut self, spec: &AddSpec, search: &LibrarySearch) -> Result<(), InitramfsError> {
        let meta = fs::metadata(&spec.host).map_err(|source| InitramfsError::AddMissing {
            spec: spec.arg.clone(),
            host: spec.host.clone(),
            source,
        })?;
        let mut deps = DepResolver::new(search);
        if meta.is_dir() {
            self.add_tree(&spec.host, &spec.guest, &meta, &mut deps)?;
        } else if meta.is_file() {
            self.add_tree_file(&spec.host, &spec.guest, &meta, &mut deps)?;
        } else {
            return Err(InitramfsError::AddNotFileOrDir {
                host: spec.host.clone(),
            });
        }
        if self.needs_ld_cache {
            // A library found through /etc/ld.so.conf only: the guest's loader
            // finds it through the cache too.
            let cache = Path::new("/etc/ld.so.cache");
            if let Ok(m) = fs::metadata(cache) {
                if m.is_file() {
                    self.insert(
                        "/etc/ld.so.cache",
                        Entry::from_host(
                            EntryKind::File(Contents::Host(cache.to_path_buf())),
                            &m,
                            Origin::Dependency,
                        ),
                    )?;
                }
            }
        }
        Ok(())
    }

    fn add_tree(
        &mut self,
        host: &Path,
        guest: &str,
        meta: &fs::Metadata,
        deps: &mut DepResolver<'_>,
    ) -> Result<(), InitramfsError> {
        let read_err = |source| InitramfsError::Read {
            path: host.to_path_buf(),
            source,
        };
        let dir = self.insert(guest, Entry::from_host(EntryKind::Dir, meta, Origin::Add))?;
        let mut children = fs::read_dir(host)
            .map_err(read_err)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(read_err)?;
        children.sort_by_key(fs::DirEntry::file_name);
        for child in children {
            let hpath = child.path();
            let name = child.file_name();
            let name = name.to_str().ok_or_else(|| InitramfsError::NotUtf8 {
                path: hpath.clone(),
            })?;
            let gpath = join_path(&dir, name);
            let m = fs::symlink_metadata(&hpath).map_err(|source| InitramfsError::Read {
                path: hpath.clone(),
                source,
            })?;
            let ft = m.file_type();
            if ft.is_symlink() {
                let target = fs::read_link(&hpath).map_err(|source| InitramfsError::Read {
                    path: hpath.clone(),
                    source,
                })?;
                let target = path_str(&target)?.to_string();
                self.insert(
                    &gpath,
                    Entry::from_host(EntryKind::Symlink(target), &m, Origin::Add),
                )?;
            } else if ft.is_dir() {
                self.add_tree(&hpath, &gpath, &m, deps)?;
            } else if ft.is_file() {
                self.add_tree_file(&hpath, &gpath, &m, deps)?;
            }
            // Sockets, fifos and devices: left out.
        }
        Ok(())
    }

    fn add_tree_file(
        &mut self,
        host: &Path,
        guest: &str,
        meta: &fs::Metadata,
        deps: &mut DepResolver<'_>,
    ) -> Result<(), InitramfsError> {
        let guest = self.insert(
            guest,
            Entry::from_host(
                EntryKind::File(Contents::Host(host.to_path_buf())),
                meta,
                Origin::Add,
            ),
        )?;
        deps.add_deps(self, host, &guest)
    }

    /// The archive: every entry in path order, then the trailer.
    pub fn to_cpio(&self) -> Result<Vec<u8>, InitramfsError> {
        let mut w = CpioWriter::new();
        for (path, e) in &self.entries {
            let name = &path[1..];
            match &e.kind {
                EntryKind::Dir => w.dir(name, e.mode, e.meta)?,
                EntryKind::File(contents) => {
                    let data: Cow<'_, [u8]> = match contents {
                        Contents::Bytes(b) => Cow::Borrowed(b),
                        Contents::Host(p) => {
                            let read_err = |source| InitramfsError::Read {
                                path: p.clone(),
                                source,
                            };
                            if fs::metadata(p).map_err(read_err)?.len() > u64::from(u32::MAX) {
                                return Err(InitramfsError::TooLarge {
                                    name: p.display().to_string(),
                                });
                            }
                            Cow::Owned(fs::read(p).map_err(read_err)?)
                        }
                    };
                    w.file(name, e.mode, &data, e.meta)?;
                }
                EntryKind::Symlink(target) => w.symlink(name, target, e.meta)?,
                EntryKind::CharDevice { major, minor } => {
                    w.device(name, false, e.mode, (*major, *minor), e.meta)?;
                }
                EntryKind::BlockDevice { major, minor } => {
                    w.device(name, true, e.mode, (*major, *minor), e.meta)?;
                }
                EntryKind::Fifo => w.fifo(name, e.mode, e.meta)?,
            }
        }
        w.finish()
    }
}

/// The initramfs of a run: the entries of `base_initrd` (but its `/init`), the
/// standard directories and `/dev/console`, `modules` (`(host, guest)` pairs
/// from [`resolve_modules`]), the files of `adds` with the libraries they
/// need (found with [`LibrarySearch::host`]), `init_elf` at `/init` and
/// `spec` at [`run_protocol::SPEC_PATH`]; an uncompressed newc cpio archive.
pub fn build(
    init_elf: &[u8],
    spec: &Spec,
    base_initrd: Option<&Path>,
    modules: &[(PathBuf, String)],
    adds: &[AddSpec],
) -> Result<Vec<u8>, InitramfsError> {
    plan(
        init_elf,
        spec,
        base_initrd,
        modules,
        adds,
        &LibrarySearch::host(),
    )?
    .to_cpio()
}

/// What [`build`] writes, with the libraries searched with `search`.
pub fn plan(
    init_elf: &[u8],
    spec: &Spec,
    base_initrd: Option<&Path>,
    modules: &[(PathBuf, String)],
    adds: &[AddSpec],
    search: &LibrarySearch,
) -> Result<InitramfsPlan, InitramfsError> {
    let mut plan = InitramfsPlan::new();
    if let Some(base) = base_initrd {
        plan.add_initrd(base)?;
    }
    plan.add_standard()?;
    plan.add_modules(modules)?;
    for add in adds {
        plan.add(add, search)?;
    }
    plan.add_init(init_elf, spec)?;
    Ok(plan)
}

// ---------------------------------------------------------------------------
// Reading an initrd
// ---------------------------------------------------------------------------

/// The entries of the initrd at `path`, in archive order, with absolute
/// normalized paths (the root entry left out): newc (or newc with CRC) cpio
/// archives, each plain or compressed with gzip, zstd or xz, one after the
/// other with zero padding between them, as the kernel reads them. Hard links
/// become regular files with the same contents; sockets are left out.
pub fn read_initrd(path: &Path) -> Result<Vec<(String, Entry)>, InitramfsError> {
    let data = fs::read(path).map_err(|source| InitramfsError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_initrd(&data, path)
}

/// What starts at a point of an initrd.
#[derive(Debug, Clone, Copy)]
enum Segment {
    Cpio,
    OldCpio,
    Gzip,
    Zstd,
    Xz,
    Unsupported(&'static str),
    Unknown,
}

fn detect(data: &[u8]) -> Segment {
    const MAGICS: &[(&[u8], Segment)] = &[
        (b"070701", Segment::Cpio),
        (b"070702", Segment::Cpio),
        (b"070707", Segment::OldCpio),
        (&[0x1f, 0x8b], Segment::Gzip),
        (&[0x28, 0xb5, 0x2f, 0xfd], Segment::Zstd),
        (&[0xfd, b'7', b'z', b'X', b'Z', 0], Segment::Xz),
        (&[0x02, 0x21, 0x4c, 0x18], Segment::Unsupported("lz4")),
        (
            &[0x04, 0x22, 0x4d, 0x18],
            Segment::Unsupported("lz4 (frame format)"),
        ),
        (b"BZh", Segment::Unsupported("bzip2")),
        (&[0x89, b'L', b'Z', b'O'], Segment::Unsupported("lzo")),
        (&[0x5d, 0x00, 0x00], Segment::Unsupported("lzma")),
        (&[0x1f, 0x9e], Segment::Unsupported("old gzip")),
    ];
    MAGICS
        .iter()
        .find(|(magic, _)| data.starts_with(magic))
        .map_or(Segment::Unknown, |&(_, seg)| seg)
}

/// Where in the initrd a stream of archives is.
struct Source<'a> {
    path: &'a Path,
    /// The stream.
    data: &'a [u8],
    /// The compression and offset of the data it was decompressed from.
    within: Option<(&'static str, u64)>,
}

impl Source<'_> {
    fn format_error(&self, at: &[u8], what: impl std::fmt::Display) -> InitramfsError {
        let offset = self.data.len() - at.len();
        let location = match self.within {
            None => format!("byte {offset}"),
            Some((compression, start)) => {
                format!("byte {offset} of the {compression} data at byte {start}")
            }
        };
        InitramfsError::InitrdFormat {
            path: self.path.to_path_buf(),
            location,
            what: what.to_string(),
        }
    }
}

fn parse_initrd(data: &[u8], path: &Path) -> Result<Vec<(String, Entry)>, InitramfsError> {
    let mut out = Vec::new();
    let top = Source {
        path,
        data,
        within: None,
    };
    let mut rest = data;
    while let Some(skip) = rest.iter().position(|&b| b != 0) {
        rest = &rest[skip..];
        let offset = (data.len() - rest.len()) as u64;
        let decompress_err = |compression, source| InitramfsError::InitrdDecompress {
            path: path.to_path_buf(),
            offset,
            compression,
            source,
        };
        let (compression, plain, after): (&'static str, Vec<u8>, &[u8]) = match detect(rest) {
            Segment::Cpio => {
                rest = read_cpio(&top, rest, &mut out)?;
                continue;
            }
            Segment::OldCpio => {
                return Err(top.format_error(
                    rest,
                    "an old (odc) cpio archive, which the kernel does not read",
                ))
            }
            // Members (frames) right after one another are one stream, as
            // for the kernel: an archive may go on from one to the next.
            Segment::Gzip => {
                let mut src = rest;
                let mut plain = Vec::new();
                while matches!(detect(src), Segment::Gzip) {
                    let mut dec = flate2::bufread::GzDecoder::new(src);
                    dec.read_to_end(&mut plain)
                        .map_err(|e| decompress_err("gzip", e))?;
                    src = dec.into_inner();
                }
                ("gzip", plain, src)
            }
            Segment::Zstd => {
                let mut src = rest;
                let mut plain = Vec::new();
                while matches!(detect(src), Segment::Zstd) {
                    let mut dec = ruzstd::decoding::StreamingDecoder::new(&mut src)
                        .map_err(|e| decompress_err("zstd", io::Error::other(e)))?;
                    dec.read_to_end(&mut plain)
                        .map_err(|e| decompress_err("zstd", e))?;
                }
                ("zstd", plain, src)
            }
            Segment::Xz => {
                // lzma-rs reads one stream to the end of its input: give it
                // the rest less trailing padding (the last segment, then).
                let end = rest.iter().rposition(|&b| b != 0).map_or(0, |p| p + 1);
                let mut input = &rest[..end];
                let mut plain = Vec::new();
                lzma_rs::xz_decompress(&mut input, &mut plain)
                    .map_err(|e| decompress_err("xz", io::Error::other(e.to_string())))?;
                ("xz", plain, &rest[rest.len()..])
            }
            Segment::Unsupported(compression) => {
                return Err(InitramfsError::InitrdCompression {
                    path: path.to_path_buf(),
                    offset,
                    compression,
                })
            }
            Segment::Unknown => {
                return Err(
                    top.format_error(rest, "neither a cpio header nor known compressed data")
                )
            }
        };
        let inner = Source {
            path,
            data: &plain,
            within: Some((compression, offset)),
        };
        let mut p = &plain[..];
        while let Some(skip) = p.iter().position(|&b| b != 0) {
            p = &p[skip..];
            match detect(p) {
                Segment::Cpio => p = read_cpio(&inner, p, &mut out)?,
                _ => return Err(inner.format_error(p, "no newc cpio header")),
            }
        }
        rest = after;
    }
    Ok(out)
}

/// Reads one archive (up to its trailer, or the end of the data) into `out`;
/// returns what follows it.
fn read_cpio<'a>(
    src: &Source<'_>,
    mut rest: &'a [u8],
    out: &mut Vec<(String, Entry)>,
) -> Result<&'a [u8], InitramfsError> {
    // Hard links: (ino, dev major, dev minor) -> indexes in `archive`.
    let mut links: HashMap<(u32, u32, u32), Vec<usize>> = HashMap::new();
    let mut archive: Vec<(String, Entry)> = Vec::new();
    loop {
        if rest.iter().all(|&b| b == 0) {
            // No trailer: the data ends here (the kernel does not mind).
            break;
        }
        let at = rest;
        let mut reader = newc::Reader::new(rest).map_err(|e| src.format_error(at, e))?;
        let e = reader.entry().clone();
        if e.is_trailer() {
            rest = reader.finish().map_err(|e| src.format_error(at, e))?;
            break;
        }
        let size = e.file_size() as usize;
        let mut data = Vec::with_capacity(size.min(at.len()));
        reader
            .read_to_end(&mut data)
            .map_err(|err| src.format_error(at, err))?;
        if data.len() != size {
            return Err(src.format_error(at, format!("the entry {} is cut short", e.name())));
        }
        rest = reader.finish().map_err(|err| src.format_error(at, err))?;

        let path = normalize_guest_path(e.name());
        if path == "/" {
            continue;
        }
        let (major, minor) = (e.rdev_major(), e.rdev_minor());
        let kind = match e.mode() & S_IFMT {
            S_IFDIR => EntryKind::Dir,
            S_IFREG => {
                if e.nlink() > 1 {
                    links
                        .entry((e.ino(), e.dev_major(), e.dev_minor()))
                        .or_default()
                        .push(archive.len());
                }
                EntryKind::File(Contents::Bytes(data))
            }
            S_IFLNK => EntryKind::Symlink(String::from_utf8_lossy(&data).into_owned()),
            S_IFCHR => EntryKind::CharDevice { major, minor },
            S_IFBLK => EntryKind::BlockDevice { major, minor },
            S_IFIFO => EntryKind::Fifo,
            S_IFSOCK => continue,
            _ => {
                return Err(
                    src.format_error(at, format!("the entry {} has an unknown type", e.name()))
                )
            }
        };
        let entry = Entry {
            kind,
            mode: e.mode() & 0o7777,
            meta: Meta {
                uid: e.uid(),
                gid: e.gid(),
                mtime: e.mtime(),
            },
            origin: Origin::Base,
        };
        archive.push((path, entry));
    }
    // In newc, the data of hard-linked files is in one of the entries (the
    // last, as GNU cpio writes them); the others are empty.
    for indexes in links.values().filter(|v| v.len() > 1) {
        let data = indexes
            .iter()
            .rev()
            .find_map(|&i| match &archive[i].1.kind {
                EntryKind::File(Contents::Bytes(b)) if !b.is_empty() => Some(b.clone()),
                _ => None,
            });
        if let Some(data) = data {
            for &i in indexes {
                archive[i].1.kind = EntryKind::File(Contents::Bytes(data.clone()));
            }
        }
    }
    out.extend(archive);
    Ok(rest)
}

// ---------------------------------------------------------------------------
// Kernel version
// ---------------------------------------------------------------------------

/// The version (`uname -r`) of a kernel image: from the setup header of a
/// bzImage (`HdrS` at 0x202, the string at `kernel_version` (0x20E) + 0x200),
/// else from the first `Linux version ` string followed by a version (an ELF
/// vmlinux, or any uncompressed image).
pub fn kernel_version(image: &[u8]) -> Option<String> {
    if image.get(0x202..0x206) == Some(&b"HdrS"[..]) {
        if let Some(&[lo, hi]) = image.get(0x20e..0x210) {
            let ptr = u16::from_le_bytes([lo, hi]) as usize;
            if ptr != 0 {
                if let Some(v) = image.get(ptr + 0x200..).and_then(version_word) {
                    return Some(v);
                }
            }
        }
    }
    const BANNER: &[u8] = b"Linux version ";
    memchr::memmem::find_iter(image, BANNER)
        .find_map(|at| version_word(&image[at + BANNER.len()..]))
}

/// The version word at the start of `s`: up to a space or NUL, starting with
/// a digit, all printable.
fn version_word(s: &[u8]) -> Option<String> {
    let end = s
        .iter()
        .take(256)
        .position(|&b| b == 0 || b.is_ascii_whitespace())?;
    let word = &s[..end];
    if word.first().is_some_and(u8::is_ascii_digit) && word.iter().all(u8::is_ascii_graphic) {
        Some(String::from_utf8_lossy(word).into_owned())
    } else {
        None
    }
}

/// [`kernel_version`] of the image file at `path`.
/// A bzImage's setup code and its version string lie in its first
/// [`VERSION_PREFIX`] bytes, so only they are read; another image is read
/// whole.
pub fn kernel_version_of(path: &Path) -> Result<String, InitramfsError> {
    let read_err = |source| InitramfsError::Read {
        path: path.to_path_buf(),
        source,
    };
    let mut prefix = Vec::with_capacity(VERSION_PREFIX);
    fs::File::open(path)
        .and_then(|f| f.take(VERSION_PREFIX as u64).read_to_end(&mut prefix))
        .map_err(read_err)?;
    let found = if prefix.get(0x202..0x206) == Some(&b"HdrS"[..]) {
        kernel_version(&prefix)
    } else {
        None
    };
    let found = match found {
        Some(v) => Some(v),
        None => kernel_version(&fs::read(path).map_err(read_err)?),
    };
    found.ok_or_else(|| InitramfsError::NoKernelVersion {
        path: path.to_path_buf(),
    })
}

/// Bytes read first to find a bzImage's version (its setup code is at most
/// 64 KiB).
const VERSION_PREFIX: usize = 64 << 10;

// ---------------------------------------------------------------------------
// Kernel modules
// ---------------------------------------------------------------------------

/// The modules tree of kernel `version` on this host.
pub fn default_modules_dir(version: &str) -> PathBuf {
    Path::new("/lib/modules").join(version)
}

/// The name of a module from its file name or path, as modprobe compares
/// them: the file's stem (`.ko`, `.ko.xz`, `.ko.zst`, `.ko.gz` taken off),
/// `-` as `_`.
pub fn module_name(file: &str) -> String {
    let base = file.rsplit('/').next().unwrap_or(file);
    let stem = [".ko.xz", ".ko.zst", ".ko.gz", ".ko"]
        .iter()
        .find_map(|s| base.strip_suffix(s))
        .unwrap_or(base);
    stem.replace('-', "_")
}

/// The files to load for the modules `names` (`-` and `_` alike) of kernel
/// `version` whose tree is `dir` (holding `modules.dep` as depmod writes it):
/// each with what it depends on, dependencies first, each once; as
/// `(host path, guest path)` with the guest path
/// `/lib/modules/VERSION/<path in modules.dep>`. A module built into the
/// kernel (in `modules.builtin`) needs nothing. The `optional` ones come
/// after, when the tree has them (else they are left out).
pub fn resolve_modules(
    dir: &Path,
    version: &str,
    names: &[&str],
    optional: &[&str],
) -> Result<Vec<(PathBuf, String)>, InitramfsError> {
    let dep_path = dir.join("modules.dep");
    let text = fs::read_to_string(&dep_path).map_err(|source| InitramfsError::NoModulesTree {
        dir: dir.to_path_buf(),
        version: version.to_string(),
        source,
    })?;
    // Module path -> its dependencies; module name -> its path.
    let mut deps: HashMap<&str, Vec<&str>> = HashMap::new();
    let mut by_name: HashMap<String, &str> = HashMap::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (module, rest) = line
            .split_once(':')
            .ok_or_else(|| InitramfsError::BadModulesDep {
                path: dep_path.clone(),
                line: i + 1,
            })?;
        let module = module.trim();
        deps.insert(module, rest.split_whitespace().collect());
        by_name.entry(module_name(module)).or_insert(module);
    }
    let builtin: HashSet<String> = fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(module_name)
        .collect();

    let mut order: Vec<(&str, &str)> = Vec::new(); // (module path, asked-for name)
    let mut placed: HashSet<&str> = HashSet::new();
    for &name in names {
        let wanted = module_name(name);
        if let Some(&module) = by_name.get(&wanted) {
            place(module, name, &deps, &mut placed, &mut order);
        } else if !builtin.contains(&wanted) {
            return Err(InitramfsError::ModuleNotFound {
                name: name.to_string(),
                dir: dir.to_path_buf(),
            });
        }
    }
    for &name in optional {
        match by_name.get(&module_name(name)) {
            Some(&module) => place(module, name, &deps, &mut placed, &mut order),
            None => log::debug!("optional module {name}: not in {}", dep_path.display()),
        }
    }

    let mut out = Vec::with_capacity(order.len());
    for (module, asked) in order {
        let (host, guest) = if module.starts_with('/') {
            (PathBuf::from(module), normalize_guest_path(module))
        } else {
            (
                dir.join(module),
                normalize_guest_path(&format!("/lib/modules/{version}/{module}")),
            )
        };
        fs::metadata(&host).map_err(|source| InitramfsError::ModuleFileMissing {
            module: asked.to_string(),
            path: host.clone(),
            source,
        })?;
        out.push((host, guest));
    }
    Ok(out)
}

/// Puts `module` after all it depends on (depth first; a cycle, which depmod
/// does not write, is cut where it closes).
fn place<'a>(
    module: &'a str,
    asked: &'a str,
    deps: &HashMap<&'a str, Vec<&'a str>>,
    placed: &mut HashSet<&'a str>,
    order: &mut Vec<(&'a str, &'a str)>,
) {
    if !placed.insert(module) {
        return;
    }
    // modprobe loads the listed dependencies last to first.
    for &dep in deps.get(module).into_iter().flatten().rev() {
        place(dep, asked, deps, placed, order);
    }
    order.push((module, asked));
}

// ---------------------------------------------------------------------------
// --add
// ---------------------------------------------------------------------------

/// One `--add HOST[:GUEST]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AddSpec {
    /// The argument as given.
    pub arg: String,
    /// The host file or directory.
    pub host: PathBuf,
    /// Where it goes in the guest (absolute, normalized).
    pub guest: String,
}

impl AddSpec {
    /// Reads `HOST[:GUEST]`, split at the last `:` (unless the whole argument
    /// names a host file and what follows the last `:` is not absolute).
    /// GUEST defaults to HOST made absolute; a relative GUEST is an error, and
    /// so is a HOST that does not exist.
    pub fn parse(arg: &str) -> Result<Self, InitramfsError> {
        let (host, guest) = match arg.rsplit_once(':') {
            Some((h, g)) if g.starts_with('/') || !Path::new(arg).exists() => (h, Some(g)),
            _ => (arg, None),
        };
        let host = PathBuf::from(host);
        let guest = match guest {
            Some(g) if g.starts_with('/') => normalize_guest_path(g),
            Some(g) => {
                return Err(InitramfsError::AddRelativeGuest {
                    spec: arg.to_string(),
                    guest: g.to_string(),
                })
            }
            None => {
                let abs =
                    std::path::absolute(&host).map_err(|source| InitramfsError::AddMissing {
                        spec: arg.to_string(),
                        host: host.clone(),
                        source,
                    })?;
                normalize_guest_path(path_str(&abs)?)
            }
        };
        fs::metadata(&host).map_err(|source| InitramfsError::AddMissing {
            spec: arg.to_string(),
            host: host.clone(),
            source,
        })?;
        Ok(Self {
            arg: arg.to_string(),
            host,
            guest,
        })
    }
}

impl FromStr for AddSpec {
    type Err = InitramfsError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

// ---------------------------------------------------------------------------
// Shared libraries of ELF files
// ---------------------------------------------------------------------------

/// The class, byte order and machine of an ELF file: a library serves only a
/// file of the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ElfKind {
    is_64: bool,
    little_endian: bool,
    machine: u16,
}

/// The host's own kind: the ELF files whose libraries are looked for.
#[cfg(target_arch = "x86_64")]
const NATIVE: Option<ElfKind> = Some(ElfKind {
    is_64: true,
    little_endian: true,
    machine: elf::EM_X86_64,
});
#[cfg(target_arch = "aarch64")]
const NATIVE: Option<ElfKind> = Some(ElfKind {
    is_64: true,
    little_endian: true,
    machine: elf::EM_AARCH64,
});
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const NATIVE: Option<ElfKind> = None;

#[cfg(target_arch = "aarch64")]
const MULTIARCH: &str = "aarch64-linux-gnu";
#[cfg(not(target_arch = "aarch64"))]
const MULTIARCH: &str = "x86_64-linux-gnu";

/// What the dynamic loader reads of an ELF file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
struct ElfInfo {
    kind: Option<ElfKind>,
    interp: Option<String>,
    needed: Vec<String>,
    rpath: Vec<String>,
    runpath: Vec<String>,
}

/// Reads the loader's view of an ELF file (an error text if it is not one).
fn parse_elf(data: &[u8]) -> Result<ElfInfo, String> {
    match FileKind::parse(data).map_err(|e| e.to_string())? {
        FileKind::Elf64 => parse_elf_as::<elf::FileHeader64<Endianness>>(data),
        FileKind::Elf32 => parse_elf_as::<elf::FileHeader32<Endianness>>(data),
        _ => Err("not an ELF file".to_string()),
    }
}

fn parse_elf_as<Elf: FileHeader<Endian = Endianness>>(data: &[u8]) -> Result<ElfInfo, String> {
    let err = |e: object::read::Error| e.to_string();
    let header = Elf::parse(data).map_err(err)?;
    let endian = header.endian().map_err(err)?;
    let mut info = ElfInfo {
        kind: Some(ElfKind {
            is_64: header.is_class_64(),
            little_endian: header.is_little_endian(),
            machine: header.e_machine(endian),
        }),
        ..ElfInfo::default()
    };
    let phdrs = header.program_headers(endian, data).map_err(err)?;
    let mut dynamic = None;
    for ph in phdrs {
        if let Some(interp) = ph.interpreter(endian, data).map_err(err)? {
            info.interp = Some(String::from_utf8_lossy(interp).into_owned());
        }
        if let Some(d) = ph.dynamic(endian, data).map_err(err)? {
            dynamic = Some(d);
        }
    }
    let Some(dynamic) = dynamic else {
        return Ok(info);
    };
    let (mut strtab, mut strsz): (Option<u64>, Option<u64>) = (None, None);
    for d in dynamic {
        match d.tag32(endian) {
            Some(elf::DT_NULL) => break,
            Some(elf::DT_STRTAB) => strtab = Some(d.d_val(endian).into()),
            Some(elf::DT_STRSZ) => strsz = Some(d.d_val(endian).into()),
            _ => {}
        }
    }
    let (Some(addr), Some(size)) = (strtab, strsz) else {
        return Ok(info);
    };
    // DT_STRTAB is an address: find the loaded segment holding it.
    let bytes = phdrs
        .iter()
        .filter(|ph| ph.p_type(endian) == elf::PT_LOAD)
        .find_map(|ph| ph.data_range(endian, data, addr, size).ok().flatten())
        .ok_or("the dynamic string table is in no loaded segment")?;
    let strings = StringTable::new(bytes, 0, size);
    for d in dynamic {
        let list = match d.tag32(endian) {
            Some(elf::DT_NULL) => break,
            Some(elf::DT_NEEDED) => &mut info.needed,
            Some(elf::DT_RPATH) => &mut info.rpath,
            Some(elf::DT_RUNPATH) => &mut info.runpath,
            _ => continue,
        };
        let s = d.string(endian, strings).map_err(err)?;
        list.push(String::from_utf8_lossy(s).into_owned());
    }
    Ok(info)
}

/// Where shared libraries are looked for after an ELF file's own
/// `DT_RUNPATH`/`DT_RPATH`: the directories of `/etc/ld.so.conf` (with its
/// `include`s), then the loader's built-in ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibrarySearch {
    /// From `/etc/ld.so.conf`, in order.
    pub conf_dirs: Vec<PathBuf>,
    /// The loader's own (`/lib/x86_64-linux-gnu`, `/usr/lib/x86_64-linux-gnu`,
    /// `/lib64`, `/usr/lib64`, `/lib`, `/usr/lib`).
    pub default_dirs: Vec<PathBuf>,
}

impl LibrarySearch {
    /// As the host's loader searches.
    pub fn host() -> Self {
        Self::from_ld_so_conf(Path::new("/etc/ld.so.conf"))
    }

    /// The directories of `conf` (an ld.so.conf; none if it cannot be read)
    /// and the default ones.
    pub fn from_ld_so_conf(conf: &Path) -> Self {
        let mut conf_dirs = Vec::new();
        read_ld_so_conf(conf, 0, &mut conf_dirs);
        Self {
            conf_dirs,
            default_dirs: default_lib_dirs(),
        }
    }
}

/// The loader's built-in directories.
pub fn default_lib_dirs() -> Vec<PathBuf> {
    [
        format!("/lib/{MULTIARCH}"),
        format!("/usr/lib/{MULTIARCH}"),
        "/lib64".to_string(),
        "/usr/lib64".to_string(),
        "/lib".to_string(),
        "/usr/lib".to_string(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect()
}

fn read_ld_so_conf(path: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    if depth > 8 {
        return;
    }
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    let here = path.parent().unwrap_or(Path::new("/"));
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with("hwcap ") {
            continue;
        }
        if let Some(patterns) = line.strip_prefix("include") {
            if patterns.starts_with(char::is_whitespace) {
                for pattern in patterns.split_whitespace() {
                    for file in glob(&here.join(pattern)) {
                        read_ld_so_conf(&file, depth + 1, out);
                    }
                }
                continue;
            }
        }
        for dir in line.split(|c: char| c == ':' || c == ',' || c.is_whitespace()) {
            let dir = PathBuf::from(dir.trim_end_matches('/'));
            if dir.is_absolute() && !out.contains(&dir) {
                out.push(dir);
            }
        }
    }
}

/// The files matching `pattern`, whose last component may hold `*` and `?`.
fn glob(pattern: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
        return Vec::new();
    };
    let Some(name) = name.to_str() else {
        return Vec::new();
    };
    if !name.contains(['*', '?']) {
        return vec![pattern.to_path_buf()];
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| wildcard_match(name.as_bytes(), n.as_bytes()))
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| wildcard_match(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && wildcard_match(rest, &name[1..]),
        Some((c, rest)) => name.first() == Some(c) && wildcard_match(rest, &name[1..]),
    }
}

/// The directories of a `DT_RPATH`/`DT_RUNPATH` list, as (host, guest) pairs:
/// `$ORIGIN` is the directory of the file on the host and in the guest.
/// Relative entries, and entries with other `$` tokens, are left out.
fn expand_search_path(
    list: &[String],
    host_origin: &Path,
    guest_origin: &str,
) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let Some(host_origin) = host_origin.to_str() else {
        return out;
    };
    for entry in list.iter().flat_map(|l| l.split(':')) {
        let (host, guest) = if entry.contains("$ORIGIN") || entry.contains("${ORIGIN}") {
            let expand = |origin: &str| {
                entry
                    .replace("${ORIGIN}", origin)
                    .replace("$ORIGIN", origin)
            };
            (expand(host_origin), expand(guest_origin))
        } else {
            (entry.to_string(), entry.to_string())
        };
        if host.contains('$') || !host.starts_with('/') || !guest.starts_with('/') {
            continue;
        }
        out.push((PathBuf::from(host), normalize_guest_path(&guest)));
    }
    out
}

/// An ELF file whose libraries are to be found.
struct Pending {
    /// The host file, as named.
    host: PathBuf,
    /// Its directory, as `$ORIGIN` on the host.
    host_origin: PathBuf,
    guest: String,
    info: ElfInfo,
    /// The `DT_RPATH`s of the files that led to it (the loader searches them
    /// too, unless the file has a `DT_RUNPATH`).
    inherited: Vec<(PathBuf, String)>,
}

/// Finds and adds the libraries of ELF files, as the loader would.
struct DepResolver<'a> {
    search: &'a LibrarySearch,
    /// Candidate host files already read: their loader's view, or `None` if
    /// they are no ELF file.
    seen: HashMap<PathBuf, Option<ElfInfo>>,
}

impl<'a> DepResolver<'a> {
    fn new(search: &'a LibrarySearch) -> Self {
        Self {
            search,
            seen: HashMap::new(),
        }
    }

    fn info(&mut self, host: &Path) -> Option<ElfInfo> {
        if let Some(info) = self.seen.get(host) {
            return info.clone();
        }
        let info = read_elf_info(host);
        self.seen.insert(host.to_path_buf(), info.clone());
        info
    }

    /// Adds to `plan` the interpreter and libraries of the host file `host`
    /// (at `guest`), if it is a dynamically linked ELF file of the host's kind.
    fn add_deps(
        &mut self,
        plan: &mut InitramfsPlan,
        host: &Path,
        guest: &str,
    ) -> Result<(), InitramfsError> {
        let Some(info) = self.info(host) else {
            return Ok(());
        };
        if info.kind != NATIVE || NATIVE.is_none() {
            log::debug!(
                "{}: not an ELF file of this host; added alone",
                host.display()
            );
            return Ok(());
        }
        // The loader takes $ORIGIN of the program from its real path.
        let real = fs::canonicalize(host).unwrap_or_else(|_| host.to_path_buf());
        let mut queue = VecDeque::from([Pending {
            host: host.to_path_buf(),
            host_origin: real.parent().unwrap_or(Path::new("/")).to_path_buf(),
            guest: guest.to_string(),
            info,
            inherited: Vec::new(),
        }]);
        let mut loaded_names: HashSet<String> = HashSet::new();
        let mut loaded_files: HashSet<PathBuf> = HashSet::new();
        while let Some(obj) = queue.pop_front() {
            if let Some(interp) = &obj.info.interp {
                let interp_path = PathBuf::from(interp);
                if loaded_files.insert(interp_path.clone()) {
                    let meta = fs::metadata(&interp_path).map_err(|source| {
                        InitramfsError::InterpreterMissing {
                            binary: obj.host.clone(),
                            interpreter: interp_path.clone(),
                            source,
                        }
                    })?;
                    plan.insert(
                        interp,
                        Entry::from_host(
                            EntryKind::File(Contents::Host(interp_path.clone())),
                            &meta,
                            Origin::Dependency,
                        ),
                    )?;
                    // The loader is loaded: a DT_NEEDED of its name (libc's)
                    // is it, not another copy found in the search path.
                    if let Some(name) = interp_path.file_name().and_then(|n| n.to_str()) {
                        loaded_names.insert(name.to_string());
                    }
                }
            }
            if obj.info.needed.is_empty() {
                continue;
            }
            let host_origin = obj.host_origin.as_path();
            let guest_origin = split_path(&obj.guest).0;
            let mut inherited = Vec::new();
            if obj.info.runpath.is_empty() {
                inherited = expand_search_path(&obj.info.rpath, host_origin, guest_origin);
            }
            inherited.extend(obj.inherited.iter().cloned());
            let mut dirs = if obj.info.runpath.is_empty() {
                inherited.clone()
            } else {
                expand_search_path(&obj.info.runpath, host_origin, guest_origin)
            };
            let n_own = dirs.len();
            for d in self
                .search
                .conf_dirs
                .iter()
                .chain(&self.search.default_dirs)
            {
                let g = d.to_str().map(normalize_guest_path);
                if let Some(g) = g {
                    dirs.push((d.clone(), g));
                }
            }
            for name in &obj.info.needed {
                if !loaded_names.insert(name.clone()) {
                    continue;
                }
                let found = if name.contains('/') {
                    let p = std::path::absolute(name).unwrap_or_else(|_| PathBuf::from(name));
                    let g = path_str(&p).map(normalize_guest_path)?;
                    self.compatible(&p).map(|info| (p, g, info, false))
                } else {
                    let search = self.search;
                    dirs.iter().enumerate().find_map(|(i, (hd, gd))| {
                        let p = hd.join(name);
                        let from_conf_only = i >= n_own && !search.default_dirs.contains(hd);
                        self.compatible(&p)
                            .map(|info| (p, join_path(gd, name), info, from_conf_only))
                    })
                };
                let Some((lib_host, lib_guest, info, from_conf_only)) = found else {
                    let mut searched: Vec<PathBuf> = Vec::new();
                    for (d, _) in &dirs {
                        if !searched.contains(d) {
                            searched.push(d.clone());
                        }
                    }
                    return Err(InitramfsError::LibraryNotFound {
                        library: name.clone(),
                        binary: obj.host.clone(),
                        searched,
                    });
                };
                if !loaded_files.insert(lib_host.clone()) {
                    continue;
                }
                plan.needs_ld_cache |= from_conf_only;
                let meta = fs::metadata(&lib_host).map_err(|source| InitramfsError::Read {
                    path: lib_host.clone(),
                    source,
                })?;
                let lib_guest = plan.insert(
                    &lib_guest,
                    Entry::from_host(
                        EntryKind::File(Contents::Host(lib_host.clone())),
                        &meta,
                        Origin::Dependency,
                    ),
                )?;
                queue.push_back(Pending {
                    host_origin: lib_host.parent().unwrap_or(Path::new("/")).to_path_buf(),
                    host: lib_host,
                    guest: lib_guest,
                    info,
                    inherited: inherited.clone(),
                });
            }
        }
        Ok(())
    }

    /// The loader's view of `path` if it is a file the loader would take: an
    /// ELF file of the host's kind.
    fn compatible(&mut self, path: &Path) -> Option<ElfInfo> {
        if !path.is_file() {
            return None;
        }
        self.info(path).filter(|i| i.kind == NATIVE)
    }
}

/// The loader's view of the host file `path`, if it is an ELF file (a
/// damaged one is logged and taken as no ELF file).
fn read_elf_info(path: &Path) -> Option<ElfInfo> {
    let mut magic = [0u8; 4];
    let mut f = fs::File::open(path).ok()?;
    f.read_exact(&mut magic).ok()?;
    if &magic != b"\x7fELF" {
        return None;
    }
    let data = fs::read(path).ok()?;
    match parse_elf(&data) {
        Ok(info) => Some(info),
        Err(e) => {
            log::warn!(
                "{}: cannot read it as an ELF file ({e}); adding it without the libraries it may need",
                path.display()
            );
            None
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
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
        ["/bin/sh", "/usr/bin/env"].into_iter().map(Path::new).find(|p| {
            read_elf_info(p).is_some_and(|i| i.interp.is_some() && i.kind == NATIVE)
        })
        .or_else(|| {
            eprintln!("SKIPPED: neither /bin/sh nor /usr/bin/env is a dynamically linked ELF file here");
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
        let spec =
            AddSpec::parse(&format!("{}:/usr/bin/s", root.join("script").display())).unwrap();
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
}
