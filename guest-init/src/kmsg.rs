//! Reading the kernel log (`/dev/kmsg`): each record goes to the host as it
//! comes (verbose runs) or only the last [`KEPT`] are kept, to be sent if the
//! run fails ([`Kmsg::send_kept`]).

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;

use run_protocol::KMSG;

use crate::port::Port;
use crate::sys;

/// Records kept when not verbose.
pub const KEPT: usize = 50;

/// Room for one record (the kernel's limit is about 1 KiB of text plus its
/// dictionary); a smaller buffer makes the read fail with EINVAL.
const RECORD_MAX: usize = 8192;

/// The kernel log, read from its oldest record on.
pub struct Kmsg {
    file: File,
    verbose: bool,
    kept: VecDeque<Vec<u8>>,
    /// It failed or ended: no more reading.
    done: bool,
}

impl Kmsg {
    /// Opens `/dev/kmsg` (non-blocking).
    pub fn open() -> io::Result<Kmsg> {
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open("/dev/kmsg")?;
        Ok(Kmsg::from_file(file))
    }

    /// Reads records from `fd` instead (tests use a SOCK_SEQPACKET socket);
    /// makes it non-blocking.
    pub fn from_fd(fd: OwnedFd) -> io::Result<Kmsg> {
        sys::set_nonblocking(&fd)?;
        Ok(Kmsg::from_file(File::from(fd)))
    }

    fn from_file(file: File) -> Kmsg {
        Kmsg {
            file,
            verbose: false,
            kept: VecDeque::with_capacity(KEPT + 1),
            done: false,
        }
    }

    /// Sends records as they come (else keeps the last [`KEPT`]).
    pub fn set_verbose(&mut self, verbose: bool) {
        self.verbose = verbose;
    }

    /// Whether there can be more to read.
    pub fn active(&self) -> bool {
        !self.done
    }

    /// Reads at most `max` of the records that are there; sends them to
    /// `port` or keeps them. The error is a failed send.
    pub fn read_records(&mut self, port: &Port, max: usize) -> io::Result<()> {
        let mut buf = vec![0u8; RECORD_MAX];
        let mut n = 0;
        while n < max && !self.done {
            match (&self.file).read(&mut buf) {
                Ok(0) => self.done = true,
                Ok(len) => {
                    n += 1;
                    if self.verbose {
                        port.send(KMSG, &buf[..len])?;
                    } else {
                        if self.kept.len() == KEPT {
                            self.kept.pop_front();
                        }
                        self.kept.push_back(buf[..len].to_vec());
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                // Records were overwritten before we read them; the next
                // read goes on from the oldest one left.
                Err(e) if e.raw_os_error() == Some(libc::EPIPE) => {}
                Err(_) => self.done = true,
            }
        }
        Ok(())
    }

    /// After a failure: reads what is left, then sends the kept records.
    pub fn send_kept(&mut self, port: &Port) -> io::Result<()> {
        self.read_records(port, 100_000)?;
        while let Some(record) = self.kept.pop_front() {
            port.send(KMSG, &record)?;
        }
        Ok(())
    }
}

impl AsFd for Kmsg {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::os::unix::net::UnixStream;

    /// A record source (a SOCK_SEQPACKET pair keeps the records apart, as
    /// `/dev/kmsg` does) and a channel whose host end is read at the end.
    fn setup() -> (Kmsg, File, Port, UnixStream) {
        let mut fds = [0; 2];
        // SAFETY: `fds` has room for the two descriptors.
        let rc = unsafe {
            libc::socketpair(
                libc::AF_UNIX,
                libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC,
                0,
                fds.as_mut_ptr(),
            )
        };
        assert_eq!(rc, 0);
        let ours = sys::own(fds[0]).unwrap();
        let theirs = sys::own(fds[1]).unwrap();
        let kmsg = Kmsg::from_fd(ours.into()).unwrap();
        let (a, b) = UnixStream::pair().unwrap();
        (kmsg, theirs, Port::from_fd(a.into()), b)
    }

    fn frames(port: Port, host: UnixStream) -> Vec<(u8, Vec<u8>)> {
        drop(port);
        let mut wire = Vec::new();
        (&host).read_to_end(&mut wire).unwrap();
        let mut d = run_protocol::Deframer::default();
        d.feed(&wire);
        std::iter::from_fn(|| d.next_frame().unwrap()).collect()
    }

    #[test]
    fn the_last_records_are_kept_and_sent_on_demand() {
        let (mut kmsg, mut src, port, host) = setup();
        for i in 0..KEPT + 10 {
            src.write_all(format!("6,{i},0,-;line {i}\n").as_bytes())
                .unwrap();
        }
        kmsg.read_records(&port, 5).unwrap();
        kmsg.read_records(&port, 1000).unwrap();
        assert!(kmsg.active());
        src.write_all(b"3,99,0,-;late\n").unwrap();
        kmsg.send_kept(&port).unwrap();
        let got = frames(port, host);
        assert_eq!(got.len(), KEPT);
        assert!(got.iter().all(|(k, _)| *k == KMSG));
        assert_eq!(got[0].1, b"6,11,0,-;line 11\n");
        assert_eq!(got[KEPT - 1].1, b"3,99,0,-;late\n");
    }

    #[test]
    fn verbose_records_go_at_once() {
        let (mut kmsg, mut src, port, host) = setup();
        kmsg.set_verbose(true);
        src.write_all(b"6,1,0,-;one\n").unwrap();
        src.write_all(b"6,2,0,-;two\n").unwrap();
        kmsg.read_records(&port, 100).unwrap();
        drop(src);
        kmsg.read_records(&port, 100).unwrap();
        assert!(!kmsg.active());
        kmsg.send_kept(&port).unwrap();
        let got = frames(port, host);
        assert_eq!(
            got,
            vec![
                (KMSG, b"6,1,0,-;one\n".to_vec()),
                (KMSG, b"6,2,0,-;two\n".to_vec())
            ]
        );
    }
}
