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

impl FromStr for Endpoint {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
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
        for bad in ["unix:", "tcp:4444", "tcp:host:x", "/tmp/x", "tcp::1"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
        assert_eq!(
            Endpoint::Unix("/tmp/q".into()).filename(),
            "unix:/tmp/q,server=on"
        );
    }
}
