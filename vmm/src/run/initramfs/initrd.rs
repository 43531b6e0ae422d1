//! Reading an initrd: newc cpio archives, plain or compressed.

use super::*;

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
pub(super) enum Segment {
    Cpio,
    OldCpio,
    Gzip,
    Zstd,
    Xz,
    Unsupported(&'static str),
    Unknown,
}

pub(super) fn detect(data: &[u8]) -> Segment {
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
pub(super) struct Source<'a> {
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

pub(super) fn parse_initrd(
    data: &[u8],
    path: &Path,
) -> Result<Vec<(String, Entry)>, InitramfsError> {
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
pub(super) fn read_cpio<'a>(
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
