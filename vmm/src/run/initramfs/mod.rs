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
//!
//! Parts: `cpio_out` (the archive writer), `initrd` (reading `--initrd`),
//! `kernel` (version and modules), `libs` (an ELF file's interpreter and
//! libraries), `paths` (guest paths), `error`; the plan is here.

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

mod cpio_out;
mod error;
mod initrd;
mod kernel;
mod libs;
mod paths;

pub use self::cpio_out::*;
pub use self::error::*;
pub use self::initrd::*;
pub use self::kernel::*;
pub use self::libs::*;
pub use self::paths::*;

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

#[cfg(test)]
mod tests;
