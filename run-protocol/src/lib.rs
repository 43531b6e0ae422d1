//! What `minivmm run` and its guest-side init (`minivmm-init`) say to each
//! other. No dependencies: the init is a small static binary.
//!
//! # The run spec
//!
//! The host writes it into the generated initramfs at [`SPEC_PATH`]: records
//! `key=value`, each ended by a NUL byte (values may hold any byte but NUL,
//! newlines included), in this order: `module=PATH` for each kernel module to
//! load (dependencies first), `share=TAG:ro|rw:PATH` for each host directory
//! to mount, `root=PATH` and `cwd=PATH` when given, `arg=ARG` for each word of
//! the command (at least one), then any options (`verbose=1`). See [`Spec`].
//!
//! # The channel
//!
//! A virtio-console port named [`PORT_NAME`] carries frames both ways: one type
//! byte, the payload length as 4 bytes little-endian, the payload. Guest to
//! host: [`READY`] when the init starts, [`STARTED`] when the command was
//! started, [`STDOUT`]/[`STDERR`] bytes of the command, [`KMSG`] records of the
//! kernel log, [`EXIT`] how it ended (see [`Exit`]). Host to guest: [`STDIN`]
//! bytes and [`STDIN_EOF`].

/// Where the run spec is in the initramfs.
pub const SPEC_PATH: &str = "/.minivmm/run";
/// The name of the virtio-console port of the channel.
pub const PORT_NAME: &str = "org.minivmm.run.0";

/// Guest → host: the init is running (payload empty).
pub const READY: u8 = 1;
/// Guest → host: the command was started (payload empty).
pub const STARTED: u8 = 2;
/// Guest → host: bytes the command wrote to its stdout.
pub const STDOUT: u8 = 3;
/// Guest → host: bytes the command wrote to its stderr.
pub const STDERR: u8 = 4;
/// Guest → host: one record of the kernel log (`/dev/kmsg` text).
pub const KMSG: u8 = 5;
/// Guest → host: how the command ended ([`Exit::encode`]).
pub const EXIT: u8 = 6;
/// Host → guest: bytes for the command's stdin.
pub const STDIN: u8 = 16;
/// Host → guest: the command's stdin ends (payload empty).
pub const STDIN_EOF: u8 = 17;

/// Largest payload of one frame; larger writes are split.
pub const MAX_PAYLOAD: usize = 64 * 1024;
/// Bytes before a frame's payload.
pub const HEADER: usize = 5;

/// Appends one frame of `kind` with `payload` (at most [`MAX_PAYLOAD`] bytes)
/// to `out`.
pub fn frame(kind: u8, payload: &[u8], out: &mut Vec<u8>) {
    debug_assert!(payload.len() <= MAX_PAYLOAD);
    out.push(kind);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(payload);
}

/// Appends `data` as frames of `kind`, split at [`MAX_PAYLOAD`] bytes.
pub fn frames(kind: u8, data: &[u8], out: &mut Vec<u8>) {
    for chunk in data.chunks(MAX_PAYLOAD) {
        frame(kind, chunk, out);
    }
}

/// A frame that does not follow the format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadFrame {
    /// Its length field.
    pub len: u32,
}

impl std::fmt::Display for BadFrame {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "a frame of {} bytes (the most is {MAX_PAYLOAD})",
            self.len
        )
    }
}

/// Reassembles frames from a byte stream fed in pieces.
#[derive(Debug, Default)]
pub struct Deframer {
    buf: Vec<u8>,
}

impl Deframer {
    /// Adds bytes that arrived.
    pub fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
    }

    /// The next whole frame, if one is there; an error if the stream is
    /// broken (a length over [`MAX_PAYLOAD`]), after which it stays broken.
    pub fn next_frame(&mut self) -> Result<Option<(u8, Vec<u8>)>, BadFrame> {
        if self.buf.len() < HEADER {
            return Ok(None);
        }
        let len = u32::from_le_bytes([self.buf[1], self.buf[2], self.buf[3], self.buf[4]]);
        if len as usize > MAX_PAYLOAD {
            return Err(BadFrame { len });
        }
        let end = HEADER + len as usize;
        if self.buf.len() < end {
            return Ok(None);
        }
        let kind = self.buf[0];
        let payload = self.buf[HEADER..end].to_vec();
        self.buf.drain(..end);
        Ok(Some((kind, payload)))
    }

    /// Bytes held (an unfinished frame).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }
}

/// How the command ended, as the init saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this status.
    Exited(i32),
    /// A signal killed it.
    Signaled(i32),
    /// No such command (in PATH, or the path given).
    NotFound(String),
    /// It exists but cannot be executed (permissions, not an executable).
    NotExecutable(String),
    /// The init could not run it (what went wrong).
    InitFailed(String),
}

impl Exit {
    /// The payload of an [`EXIT`] frame: a kind byte, a 4-byte little-endian
    /// number, then text.
    pub fn encode(&self) -> Vec<u8> {
        let (kind, n, text): (u8, i32, &str) = match self {
            Exit::Exited(c) => (0, *c, ""),
            Exit::Signaled(s) => (1, *s, ""),
            Exit::NotFound(t) => (2, 0, t),
            Exit::NotExecutable(t) => (3, 0, t),
            Exit::InitFailed(t) => (4, 0, t),
        };
        let mut v = vec![kind];
        v.extend_from_slice(&n.to_le_bytes());
        v.extend_from_slice(text.as_bytes());
        v
    }

    /// Reads an [`EXIT`] payload.
    pub fn decode(p: &[u8]) -> Option<Exit> {
        if p.len() < 5 {
            return None;
        }
        let n = i32::from_le_bytes([p[1], p[2], p[3], p[4]]);
        let text = String::from_utf8_lossy(&p[5..]).into_owned();
        Some(match p[0] {
            0 => Exit::Exited(n),
            1 => Exit::Signaled(n),
            2 => Exit::NotFound(text),
            3 => Exit::NotExecutable(text),
            4 => Exit::InitFailed(text),
            _ => return None,
        })
    }
}

/// A host directory the init mounts (virtio-fs) before the command starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Share {
    /// The virtio-fs tag (never holds ':').
    pub tag: String,
    /// Where to mount it, an absolute guest path (in the init's namespace).
    pub path: Vec<u8>,
    /// Mount it read-only.
    pub read_only: bool,
}

impl Share {
    fn encode(&self) -> Vec<u8> {
        let mut v = self.tag.as_bytes().to_vec();
        v.extend_from_slice(if self.read_only { b":ro:" } else { b":rw:" });
        v.extend_from_slice(&self.path);
        v
    }

    fn decode(v: &[u8]) -> Option<Share> {
        let mut parts = v.splitn(3, |&b| b == b':');
        let tag = String::from_utf8(parts.next()?.to_vec()).ok()?;
        let read_only = match parts.next()? {
            b"ro" => true,
            b"rw" => false,
            _ => return None,
        };
        let path = parts.next()?.to_vec();
        (!tag.is_empty() && path.first() == Some(&b'/')).then_some(Share {
            tag,
            path,
            read_only,
        })
    }
}

/// What the init is to do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Spec {
    /// Kernel modules to load, in order (guest paths).
    pub modules: Vec<String>,
    /// Host directories to mount, in order (a mount's parent first).
    pub shares: Vec<Share>,
    /// The command's root directory (`--host-root`: where the host's `/` is
    /// mounted); the init gives it fresh `/proc`, `/sys`, `/dev`, `/tmp` and
    /// `/run` and the command runs chroot'ed there. None: the initramfs.
    pub root: Option<Vec<u8>>,
    /// The command's working directory (inside its root); default `/`.
    pub cwd: Option<Vec<u8>>,
    /// The command and its arguments.
    pub argv: Vec<Vec<u8>>,
    /// Forward the kernel log to the host as it comes (else only on a failure).
    pub verbose: bool,
}

impl Spec {
    /// Its file contents.
    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::new();
        let mut rec = |k: &str, val: &[u8]| {
            v.extend_from_slice(k.as_bytes());
            v.push(b'=');
            v.extend_from_slice(val);
            v.push(0);
        };
        for m in &self.modules {
            rec("module", m.as_bytes());
        }
        for sh in &self.shares {
            rec("share", &sh.encode());
        }
        if let Some(r) = &self.root {
            rec("root", r);
        }
        if let Some(c) = &self.cwd {
            rec("cwd", c);
        }
        for a in &self.argv {
            rec("arg", a);
        }
        if self.verbose {
            rec("verbose", b"1");
        }
        v
    }

    /// Reads a spec file; the error says what is wrong.
    pub fn decode(bytes: &[u8]) -> Result<Spec, String> {
        let mut s = Spec::default();
        for rec in bytes.split(|&b| b == 0).filter(|r| !r.is_empty()) {
            let eq = rec.iter().position(|&b| b == b'=').ok_or_else(|| {
                format!("a record without '=': {:?}", String::from_utf8_lossy(rec))
            })?;
            let (k, v) = (&rec[..eq], &rec[eq + 1..]);
            match k {
                b"module" => s.modules.push(String::from_utf8_lossy(v).into_owned()),
                b"share" => {
                    s.shares.push(Share::decode(v).ok_or_else(|| {
                        format!("bad share record {:?}", String::from_utf8_lossy(v))
                    })?)
                }
                b"root" => s.root = Some(v.to_vec()),
                b"cwd" => s.cwd = Some(v.to_vec()),
                b"arg" => s.argv.push(v.to_vec()),
                b"verbose" => s.verbose = v == b"1",
                other => {
                    return Err(format!(
                        "unknown record {:?}",
                        String::from_utf8_lossy(other)
                    ))
                }
            }
        }
        if s.argv.is_empty() {
            return Err("no command".into());
        }
        Ok(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_survive_any_split() {
        let mut wire = Vec::new();
        frame(READY, b"", &mut wire);
        frames(STDOUT, &vec![7u8; MAX_PAYLOAD + 10], &mut wire);
        frame(EXIT, &Exit::Signaled(9).encode(), &mut wire);
        for step in [1, 3, 4096, wire.len()] {
            let mut d = Deframer::default();
            let mut got = Vec::new();
            for chunk in wire.chunks(step) {
                d.feed(chunk);
                while let Some(f) = d.next_frame().unwrap() {
                    got.push(f);
                }
            }
            assert_eq!(got.len(), 4, "step {step}");
            assert_eq!(got[0], (READY, vec![]));
            assert_eq!(got[1].1.len(), MAX_PAYLOAD);
            assert_eq!(got[2], (STDOUT, vec![7; 10]));
            assert_eq!(Exit::decode(&got[3].1), Some(Exit::Signaled(9)));
            assert_eq!(d.pending(), 0);
        }
    }

    #[test]
    fn an_oversized_frame_is_an_error() {
        let mut d = Deframer::default();
        d.feed(&[STDOUT, 0xff, 0xff, 0xff, 0xff]);
        assert_eq!(d.next_frame(), Err(BadFrame { len: u32::MAX }));
    }

    #[test]
    fn exits_round_trip() {
        for e in [
            Exit::Exited(0),
            Exit::Exited(-1),
            Exit::Signaled(9),
            Exit::NotFound("nope: not found".into()),
            Exit::NotExecutable("x".into()),
            Exit::InitFailed("mount /proc: EPERM".into()),
        ] {
            assert_eq!(Exit::decode(&e.encode()), Some(e));
        }
        assert_eq!(Exit::decode(&[9, 0, 0, 0, 0]), None);
        assert_eq!(Exit::decode(&[0]), None);
    }

    #[test]
    fn specs_round_trip_with_any_bytes_but_nul() {
        let s = Spec {
            modules: vec!["/lib/modules/6.1/virtio.ko".into()],
            argv: vec![b"sh".to_vec(), b"-c".to_vec(), b"echo a=b\nexit 7".to_vec()],
            verbose: true,
            ..Default::default()
        };
        assert_eq!(Spec::decode(&s.encode()), Ok(s));
        let s = Spec {
            shares: vec![
                Share {
                    tag: "share0".into(),
                    path: b"/.minivmm/root".to_vec(),
                    read_only: true,
                },
                Share {
                    tag: "share1".into(),
                    path: b"/.minivmm/root/a:b/c\nd".to_vec(),
                    read_only: false,
                },
            ],
            root: Some(b"/.minivmm/root".to_vec()),
            cwd: Some(b"/a:b/c".to_vec()),
            argv: vec![b"./t".to_vec()],
            ..Default::default()
        };
        assert_eq!(Spec::decode(&s.encode()), Ok(s));
        for bad in [
            &b"share=t:rx:/p\0arg=x\0"[..],
            b"share=t:ro:p\0arg=x\0",
            b"share=:ro:/p\0arg=x\0",
        ] {
            assert!(Spec::decode(bad).unwrap_err().contains("bad share"));
        }
        assert_eq!(Spec::decode(b"module=x\0"), Err("no command".into()));
        assert!(Spec::decode(b"arg\0").unwrap_err().contains("without '='"));
        assert!(Spec::decode(b"what=1\0").unwrap_err().contains("unknown"));
    }
}
