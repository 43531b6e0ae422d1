//! The newc cpio writer.

use super::*;

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
