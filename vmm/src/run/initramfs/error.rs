//! What can go wrong making the initramfs.

use super::*;

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

pub(super) fn list_dirs(dirs: &[PathBuf]) -> String {
    if dirs.is_empty() {
        return "the directories searched (none)".to_string();
    }
    dirs.iter()
        .map(|d| d.display().to_string())
        .collect::<Vec<_>>()
        .join(", ")
}
