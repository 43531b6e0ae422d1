//! Where the server listens, and how it tells.

use std::io;
use std::path::PathBuf;
use std::str::FromStr;

/// Where a server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket path.
    Unix(PathBuf),
    /// A TCP `host:port`.
    Tcp(String),
}

/// Splits QEMU's chardev options off an address: `unix:/tmp/q,server,nowait`
/// (what `-qmp` users type) is `unix:/tmp/q`. The server side is the only
/// one there is, and it never waits for a client, so `server`, `server=on`,
/// `nowait` and `wait=off` are accepted and change nothing; any other option
/// is an error that says so. A comma inside a path is written `,,`, as in QEMU.
pub fn strip_qemu_options(s: &str) -> Result<String, String> {
    let mut addr = String::new();
    let mut rest = s;
    loop {
        match rest.find(',') {
            Some(i) if rest[i + 1..].starts_with(',') => {
                addr.push_str(&rest[..=i]);
                rest = &rest[i + 2..];
            }
            Some(i) => {
                addr.push_str(&rest[..i]);
                rest = &rest[i + 1..];
                break;
            }
            None => {
                addr.push_str(rest);
                return Ok(addr);
            }
        }
    }
    for opt in rest.split(',') {
        match opt {
            "server" | "server=on" | "nowait" | "wait=off" => {}
            "server=off" | "wait" | "wait=on" => {
                return Err(format!(
                    "'{s}': '{opt}' is not supported: minivmm always listens and never waits for a client"
                ))
            }
            _ => {
                return Err(format!(
                    "'{s}': unknown option '{opt}' (accepted, for QEMU habits: server, nowait)"
                ))
            }
        }
    }
    Ok(addr)
}

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let s = &strip_qemu_options(s)?;
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a socket path, e.g. unix:/tmp/vm.qmp".into());
            }
            return Ok(Endpoint::Unix(p.into()));
        }
        if let Some(hp) = s.strip_prefix("tcp:") {
            let ok = hp
                .rsplit_once(':')
                .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok());
            if !ok {
                return Err(format!(
                    "'{s}': expected tcp:HOST:PORT, e.g. tcp:127.0.0.1:4444"
                ));
            }
            return Ok(Endpoint::Tcp(hp.to_string()));
        }
        Err(format!("'{s}': expected unix:PATH or tcp:HOST:PORT"))
    }
}

impl Endpoint {
    /// QEMU-style chardev filename.
    pub fn filename(&self) -> String {
        match self {
            Endpoint::Unix(p) => format!("unix:{},server=on", p.display()),
            Endpoint::Tcp(hp) => format!("tcp:{hp},server=on"),
        }
    }
}

/// Errors starting a server.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// Another process serves this socket.
    #[error("QMP socket {0} is in use by another process")]
    InUse(PathBuf),
    /// Something other than a socket is at the path.
    #[error("cannot listen on QMP socket {path}: it is {what}, which is left untouched (only a stale socket is replaced)")]
    NotASocket {
        /// The path.
        path: PathBuf,
        /// What is there ("a regular file").
        what: &'static str,
    },
    /// Binding failed.
    #[error("cannot listen on QMP endpoint {endpoint}")]
    Bind {
        /// The endpoint.
        endpoint: String,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Description of one listening endpoint, for `query-chardev`.
#[derive(Debug, Clone)]
pub struct ChardevInfo {
    /// QEMU-style label (`compat_monitor0`, ...).
    pub label: String,
    /// QEMU-style filename.
    pub filename: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "unix:/tmp/vm.qmp".parse::<Endpoint>(),
            Ok(Endpoint::Unix("/tmp/vm.qmp".into()))
        );
        assert_eq!(
            "tcp:127.0.0.1:4444".parse::<Endpoint>(),
            Ok(Endpoint::Tcp("127.0.0.1:4444".into()))
        );
        assert_eq!(
            "tcp:[::1]:4444".parse::<Endpoint>(),
            Ok(Endpoint::Tcp("[::1]:4444".into()))
        );
        // QEMU's `-qmp unix:PATH,server,nowait` habit; `,,` is a comma.
        for (spec, path) in [
            ("unix:/tmp/q,server,nowait", "/tmp/q"),
            ("unix:/tmp/q,server=on,wait=off", "/tmp/q"),
            ("unix:/tmp/a,,b", "/tmp/a,b"),
        ] {
            assert_eq!(spec.parse::<Endpoint>(), Ok(Endpoint::Unix(path.into())));
        }
        assert_eq!(
            "tcp:127.0.0.1:4444,server,nowait".parse::<Endpoint>(),
            Ok(Endpoint::Tcp("127.0.0.1:4444".into()))
        );
        let e = "unix:/tmp/q,server,wait".parse::<Endpoint>().unwrap_err();
        assert!(e.contains("never waits"), "{e}");
        let e = "unix:/tmp/q,telnet".parse::<Endpoint>().unwrap_err();
        assert!(e.contains("unknown option 'telnet'"), "{e}");
        for bad in [
            "unix:",
            "tcp:4444",
            "tcp:host:x",
            "/tmp/x",
            "tcp::1",
            "unix:,server",
        ] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
        assert_eq!(
            Endpoint::Unix("/tmp/q".into()).filename(),
            "unix:/tmp/q,server=on"
        );
    }
}
