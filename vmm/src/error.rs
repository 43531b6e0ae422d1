//! How minivmm reports errors (Cloud Hypervisor's policy): every error's
//! `Display` describes its own level only and leaves the cause to `source()`;
//! [`error_chain`] prints the whole chain once, at the top (`main`, QMP replies).

use std::error::Error;
use std::fmt;

/// `e` and its causes, each once: "top: cause: root cause".
pub fn error_chain(e: &dyn Error) -> String {
    let mut msg = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        msg.push_str(": ");
        msg.push_str(&s.to_string());
        source = s.source();
    }
    msg
}

/// A foreign error whose `Display` already includes its causes (linux-loader's
/// errors print "Kernel Loader: failed to load ELF kernel image: Kernel Loader:
/// ..." and also return that cause as their `source()`): it is shown as one
/// link, with its own chain hidden, so the chain never says a thing twice.
#[derive(Debug)]
pub struct Flat<E>(pub E);

impl<E: fmt::Display> fmt::Display for Flat<E> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl<E: fmt::Debug + fmt::Display> Error for Flat<E> {}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn chain_prints_each_level_once() {
        let e = Outer(std::io::Error::other("root"));
        assert_eq!(error_chain(&e), "outer: root");
    }

    #[test]
    fn flat_hides_a_self_describing_chain() {
        let inner =
            linux_loader::loader::Error::Elf(linux_loader::loader::elf::Error::ReadProgramHeader);
        assert!(inner.to_string().contains("program header"));
        let flat = Flat(inner);
        assert!(flat.source().is_none());
        let text = error_chain(&flat);
        assert_eq!(text.matches("program header").count(), 1, "{text}");
    }
}
