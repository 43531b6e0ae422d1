//! The program interpreter and shared libraries of ELF files, found as the
//! host's loader finds them.

use super::*;

// ---------------------------------------------------------------------------
// Shared libraries of ELF files
// ---------------------------------------------------------------------------

/// The class, byte order and machine of an ELF file: a library serves only a
/// file of the same.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ElfKind {
    is_64: bool,
    little_endian: bool,
    machine: u16,
}

/// The host's own kind: the ELF files whose libraries are looked for.
#[cfg(target_arch = "x86_64")]
pub(super) const NATIVE: Option<ElfKind> = Some(ElfKind {
    is_64: true,
    little_endian: true,
    machine: elf::EM_X86_64,
});
#[cfg(target_arch = "aarch64")]
pub(super) const NATIVE: Option<ElfKind> = Some(ElfKind {
    is_64: true,
    little_endian: true,
    machine: elf::EM_AARCH64,
});
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
pub(super) const NATIVE: Option<ElfKind> = None;

#[cfg(target_arch = "aarch64")]
pub(super) const MULTIARCH: &str = "aarch64-linux-gnu";
#[cfg(not(target_arch = "aarch64"))]
pub(super) const MULTIARCH: &str = "x86_64-linux-gnu";

/// What the dynamic loader reads of an ELF file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct ElfInfo {
    pub(super) kind: Option<ElfKind>,
    pub(super) interp: Option<String>,
    pub(super) needed: Vec<String>,
    pub(super) rpath: Vec<String>,
    pub(super) runpath: Vec<String>,
}

/// Reads the loader's view of an ELF file (an error text if it is not one).
pub(super) fn parse_elf(data: &[u8]) -> Result<ElfInfo, String> {
    match FileKind::parse(data).map_err(|e| e.to_string())? {
        FileKind::Elf64 => parse_elf_as::<elf::FileHeader64<Endianness>>(data),
        FileKind::Elf32 => parse_elf_as::<elf::FileHeader32<Endianness>>(data),
        _ => Err("not an ELF file".to_string()),
    }
}

pub(super) fn parse_elf_as<Elf: FileHeader<Endian = Endianness>>(
    data: &[u8],
) -> Result<ElfInfo, String> {
    let err = |e: object::read::Error| e.to_string();
    let header = Elf::parse(data).map_err(err)?;
    let endian = header.endian().map_err(err)?;
    let mut info = ElfInfo {
        kind: Some(ElfKind {
            is_64: header.is_class_64(),
            little_endian: header.is_little_endian(),
            machine: header.e_machine(endian),
        }),
        ..ElfInfo::default()
    };
    let phdrs = header.program_headers(endian, data).map_err(err)?;
    let mut dynamic = None;
    for ph in phdrs {
        if let Some(interp) = ph.interpreter(endian, data).map_err(err)? {
            info.interp = Some(String::from_utf8_lossy(interp).into_owned());
        }
        if let Some(d) = ph.dynamic(endian, data).map_err(err)? {
            dynamic = Some(d);
        }
    }
    let Some(dynamic) = dynamic else {
        return Ok(info);
    };
    let (mut strtab, mut strsz): (Option<u64>, Option<u64>) = (None, None);
    for d in dynamic {
        match d.tag32(endian) {
            Some(elf::DT_NULL) => break,
            Some(elf::DT_STRTAB) => strtab = Some(d.d_val(endian).into()),
            Some(elf::DT_STRSZ) => strsz = Some(d.d_val(endian).into()),
            _ => {}
        }
    }
    let (Some(addr), Some(size)) = (strtab, strsz) else {
        return Ok(info);
    };
    // DT_STRTAB is an address: find the loaded segment holding it.
    let bytes = phdrs
        .iter()
        .filter(|ph| ph.p_type(endian) == elf::PT_LOAD)
        .find_map(|ph| ph.data_range(endian, data, addr, size).ok().flatten())
        .ok_or("the dynamic string table is in no loaded segment")?;
    let strings = StringTable::new(bytes, 0, size);
    for d in dynamic {
        let list = match d.tag32(endian) {
            Some(elf::DT_NULL) => break,
            Some(elf::DT_NEEDED) => &mut info.needed,
            Some(elf::DT_RPATH) => &mut info.rpath,
            Some(elf::DT_RUNPATH) => &mut info.runpath,
            _ => continue,
        };
        let s = d.string(endian, strings).map_err(err)?;
        list.push(String::from_utf8_lossy(s).into_owned());
    }
    Ok(info)
}

/// Where shared libraries are looked for after an ELF file's own
/// `DT_RUNPATH`/`DT_RPATH`: the directories of `/etc/ld.so.conf` (with its
/// `include`s), then the loader's built-in ones.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LibrarySearch {
    /// From `/etc/ld.so.conf`, in order.
    pub conf_dirs: Vec<PathBuf>,
    /// The loader's own (`/lib/x86_64-linux-gnu`, `/usr/lib/x86_64-linux-gnu`,
    /// `/lib64`, `/usr/lib64`, `/lib`, `/usr/lib`).
    pub default_dirs: Vec<PathBuf>,
}

impl LibrarySearch {
    /// As the host's loader searches.
    pub fn host() -> Self {
        Self::from_ld_so_conf(Path::new("/etc/ld.so.conf"))
    }

    /// The directories of `conf` (an ld.so.conf; none if it cannot be read)
    /// and the default ones.
    pub fn from_ld_so_conf(conf: &Path) -> Self {
        let mut conf_dirs = Vec::new();
        read_ld_so_conf(conf, 0, &mut conf_dirs);
        Self {
            conf_dirs,
            default_dirs: default_lib_dirs(),
        }
    }
}

/// The loader's built-in directories.
pub fn default_lib_dirs() -> Vec<PathBuf> {
    [
        format!("/lib/{MULTIARCH}"),
        format!("/usr/lib/{MULTIARCH}"),
        "/lib64".to_string(),
        "/usr/lib64".to_string(),
        "/lib".to_string(),
        "/usr/lib".to_string(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect()
}

pub(super) fn read_ld_so_conf(path: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    if depth > 8 {
        return;
    }
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    let here = path.parent().unwrap_or(Path::new("/"));
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with("hwcap ") {
            continue;
        }
        if let Some(patterns) = line.strip_prefix("include") {
            if patterns.starts_with(char::is_whitespace) {
                for pattern in patterns.split_whitespace() {
                    for file in glob(&here.join(pattern)) {
                        read_ld_so_conf(&file, depth + 1, out);
                    }
                }
                continue;
            }
        }
        for dir in line.split(|c: char| c == ':' || c == ',' || c.is_whitespace()) {
            let dir = PathBuf::from(dir.trim_end_matches('/'));
            if dir.is_absolute() && !out.contains(&dir) {
                out.push(dir);
            }
        }
    }
}

/// The files matching `pattern`, whose last component may hold `*` and `?`.
pub(super) fn glob(pattern: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (pattern.parent(), pattern.file_name()) else {
        return Vec::new();
    };
    let Some(name) = name.to_str() else {
        return Vec::new();
    };
    if !name.contains(['*', '?']) {
        return vec![pattern.to_path_buf()];
    }
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| wildcard_match(name.as_bytes(), n.as_bytes()))
        })
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

pub(super) fn wildcard_match(pattern: &[u8], name: &[u8]) -> bool {
    match pattern.split_first() {
        None => name.is_empty(),
        Some((b'*', rest)) => (0..=name.len()).any(|i| wildcard_match(rest, &name[i..])),
        Some((b'?', rest)) => !name.is_empty() && wildcard_match(rest, &name[1..]),
        Some((c, rest)) => name.first() == Some(c) && wildcard_match(rest, &name[1..]),
    }
}

/// The directories of a `DT_RPATH`/`DT_RUNPATH` list, as (host, guest) pairs:
/// `$ORIGIN` is the directory of the file on the host and in the guest.
/// Relative entries, and entries with other `$` tokens, are left out.
pub(super) fn expand_search_path(
    list: &[String],
    host_origin: &Path,
    guest_origin: &str,
) -> Vec<(PathBuf, String)> {
    let mut out = Vec::new();
    let Some(host_origin) = host_origin.to_str() else {
        return out;
    };
    for entry in list.iter().flat_map(|l| l.split(':')) {
        let (host, guest) = if entry.contains("$ORIGIN") || entry.contains("${ORIGIN}") {
            let expand = |origin: &str| {
                entry
                    .replace("${ORIGIN}", origin)
                    .replace("$ORIGIN", origin)
            };
            (expand(host_origin), expand(guest_origin))
        } else {
            (entry.to_string(), entry.to_string())
        };
        if host.contains('$') || !host.starts_with('/') || !guest.starts_with('/') {
            continue;
        }
        out.push((PathBuf::from(host), normalize_guest_path(&guest)));
    }
    out
}

/// An ELF file whose libraries are to be found.
pub(super) struct Pending {
    /// The host file, as named.
    host: PathBuf,
    /// Its directory, as `$ORIGIN` on the host.
    host_origin: PathBuf,
    guest: String,
    info: ElfInfo,
    /// The `DT_RPATH`s of the files that led to it (the loader searches them
    /// too, unless the file has a `DT_RUNPATH`).
    inherited: Vec<(PathBuf, String)>,
}

/// Finds and adds the libraries of ELF files, as the loader would.
pub(super) struct DepResolver<'a> {
    search: &'a LibrarySearch,
    /// Candidate host files already read: their loader's view, or `None` if
    /// they are no ELF file.
    seen: HashMap<PathBuf, Option<ElfInfo>>,
}

impl<'a> DepResolver<'a> {
    pub(super) fn new(search: &'a LibrarySearch) -> Self {
        Self {
            search,
            seen: HashMap::new(),
        }
    }

    fn info(&mut self, host: &Path) -> Option<ElfInfo> {
        if let Some(info) = self.seen.get(host) {
            return info.clone();
        }
        let info = read_elf_info(host);
        self.seen.insert(host.to_path_buf(), info.clone());
        info
    }

    /// Adds to `plan` the interpreter and libraries of the host file `host`
    /// (at `guest`), if it is a dynamically linked ELF file of the host's kind.
    pub(super) fn add_deps(
        &mut self,
        plan: &mut InitramfsPlan,
        host: &Path,
        guest: &str,
    ) -> Result<(), InitramfsError> {
        let Some(info) = self.info(host) else {
            return Ok(());
        };
        if info.kind != NATIVE || NATIVE.is_none() {
            log::debug!(
                "{}: not an ELF file of this host; added alone",
                host.display()
            );
            return Ok(());
        }
        // The loader takes $ORIGIN of the program from its real path.
        let real = fs::canonicalize(host).unwrap_or_else(|_| host.to_path_buf());
        let mut queue = VecDeque::from([Pending {
            host: host.to_path_buf(),
            host_origin: real.parent().unwrap_or(Path::new("/")).to_path_buf(),
            guest: guest.to_string(),
            info,
            inherited: Vec::new(),
        }]);
        let mut loaded_names: HashSet<String> = HashSet::new();
        let mut loaded_files: HashSet<PathBuf> = HashSet::new();
        while let Some(obj) = queue.pop_front() {
            if let Some(interp) = &obj.info.interp {
                let interp_path = PathBuf::from(interp);
                if loaded_files.insert(interp_path.clone()) {
                    let meta = fs::metadata(&interp_path).map_err(|source| {
                        InitramfsError::InterpreterMissing {
                            binary: obj.host.clone(),
                            interpreter: interp_path.clone(),
                            source,
                        }
                    })?;
                    plan.insert(
                        interp,
                        Entry::from_host(
                            EntryKind::File(Contents::Host(interp_path.clone())),
                            &meta,
                            Origin::Dependency,
                        ),
                    )?;
                    // The loader is loaded: a DT_NEEDED of its name (libc's)
                    // is it, not another copy found in the search path.
                    if let Some(name) = interp_path.file_name().and_then(|n| n.to_str()) {
                        loaded_names.insert(name.to_string());
                    }
                }
            }
            if obj.info.needed.is_empty() {
                continue;
            }
            let host_origin = obj.host_origin.as_path();
            let guest_origin = split_path(&obj.guest).0;
            let mut inherited = Vec::new();
            if obj.info.runpath.is_empty() {
                inherited = expand_search_path(&obj.info.rpath, host_origin, guest_origin);
            }
            inherited.extend(obj.inherited.iter().cloned());
            let mut dirs = if obj.info.runpath.is_empty() {
                inherited.clone()
            } else {
                expand_search_path(&obj.info.runpath, host_origin, guest_origin)
            };
            let n_own = dirs.len();
            for d in self
                .search
                .conf_dirs
                .iter()
                .chain(&self.search.default_dirs)
            {
                let g = d.to_str().map(normalize_guest_path);
                if let Some(g) = g {
                    dirs.push((d.clone(), g));
                }
            }
            for name in &obj.info.needed {
                if !loaded_names.insert(name.clone()) {
                    continue;
                }
                let found = if name.contains('/') {
                    let p = std::path::absolute(name).unwrap_or_else(|_| PathBuf::from(name));
                    let g = path_str(&p).map(normalize_guest_path)?;
                    self.compatible(&p).map(|info| (p, g, info, false))
                } else {
                    let search = self.search;
                    dirs.iter().enumerate().find_map(|(i, (hd, gd))| {
                        let p = hd.join(name);
                        let from_conf_only = i >= n_own && !search.default_dirs.contains(hd);
                        self.compatible(&p)
                            .map(|info| (p, join_path(gd, name), info, from_conf_only))
                    })
                };
                let Some((lib_host, lib_guest, info, from_conf_only)) = found else {
                    let mut searched: Vec<PathBuf> = Vec::new();
                    for (d, _) in &dirs {
                        if !searched.contains(d) {
                            searched.push(d.clone());
                        }
                    }
                    return Err(InitramfsError::LibraryNotFound {
                        library: name.clone(),
                        binary: obj.host.clone(),
                        searched,
                    });
                };
                if !loaded_files.insert(lib_host.clone()) {
                    continue;
                }
                plan.needs_ld_cache |= from_conf_only;
                let meta = fs::metadata(&lib_host).map_err(|source| InitramfsError::Read {
                    path: lib_host.clone(),
                    source,
                })?;
                let lib_guest = plan.insert(
                    &lib_guest,
                    Entry::from_host(
                        EntryKind::File(Contents::Host(lib_host.clone())),
                        &meta,
                        Origin::Dependency,
                    ),
                )?;
                queue.push_back(Pending {
                    host_origin: lib_host.parent().unwrap_or(Path::new("/")).to_path_buf(),
                    host: lib_host,
                    guest: lib_guest,
                    info,
                    inherited: inherited.clone(),
                });
            }
        }
        Ok(())
    }

    /// The loader's view of `path` if it is a file the loader would take: an
    /// ELF file of the host's kind.
    fn compatible(&mut self, path: &Path) -> Option<ElfInfo> {
        if !path.is_file() {
            return None;
        }
        self.info(path).filter(|i| i.kind == NATIVE)
    }
}

/// The loader's view of the host file `path`, if it is an ELF file (a
/// damaged one is logged and taken as no ELF file).
pub(super) fn read_elf_info(path: &Path) -> Option<ElfInfo> {
    let mut magic = [0u8; 4];
    let mut f = fs::File::open(path).ok()?;
    f.read_exact(&mut magic).ok()?;
    if &magic != b"\x7fELF" {
        return None;
    }
    let data = fs::read(path).ok()?;
    match parse_elf(&data) {
        Ok(info) => Some(info),
        Err(e) => {
            log::warn!(
                "{}: cannot read it as an ELF file ({e}); adding it without the libraries it may need",
                path.display()
            );
            None
        }
    }
}
