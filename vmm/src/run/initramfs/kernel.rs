//! The kernel's version and the modules the run needs.

use super::*;

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
pub(super) fn version_word(s: &[u8]) -> Option<String> {
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
/// 64 KiB, so only they are read; another image is read
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
pub(super) const VERSION_PREFIX: usize = 64 << 10;

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
pub(super) fn place<'a>(
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
