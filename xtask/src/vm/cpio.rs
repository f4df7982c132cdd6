//! An in-memory initramfs description written as a cpio (newc) archive.

use anyhow::{Context, Result, anyhow};
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::hash::Hasher;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub(super) enum Source {
    Host(PathBuf),
    Bytes(Vec<u8>),
}

pub(super) enum Entry {
    Dir,
    File(Source, u32),
    Symlink(String),
    CharDev(u32, u32),
}

/// An in-memory cpio (newc) archive description.
#[derive(Default)]
pub(super) struct Archive {
    pub entries: BTreeMap<String, Entry>,
}

impl Archive {
    pub(super) fn dir(&mut self, path: &str) {
        let path = path.trim_matches('/');
        if path.is_empty() {
            return;
        }
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entries.entry(path.to_string()).or_insert(Entry::Dir);
    }
    pub(super) fn add(&mut self, path: &str, e: Entry) {
        let path = path.trim_matches('/');
        if let Some((parent, _)) = path.rsplit_once('/') {
            self.dir(parent);
        }
        self.entries.insert(path.to_string(), e);
    }
    pub(super) fn host_file(&mut self, guest: &str, host: &Path, mode: u32) {
        self.add(guest, Entry::File(Source::Host(host.to_path_buf()), mode));
    }
    pub(super) fn bytes(&mut self, guest: &str, data: impl Into<Vec<u8>>, mode: u32) {
        self.add(guest, Entry::File(Source::Bytes(data.into()), mode));
    }
    pub(super) fn symlink(&mut self, guest: &str, target: &str) {
        self.add(guest, Entry::Symlink(target.to_string()));
    }
    pub(super) fn contains(&self, guest: &str) -> bool {
        self.entries.contains_key(guest.trim_matches('/'))
    }

    /// Hash of everything that ends up in the archive (contents included).
    pub(super) fn hash(&self, salt: &str) -> Result<String> {
        // Two differently seeded SipHashes: 128 bits, deterministic per toolchain.
        let mut h1 = std::hash::DefaultHasher::new();
        let mut h2 = std::hash::DefaultHasher::new();
        h2.write(b"second");
        let mut feed = |b: &[u8]| {
            h1.write(b);
            h2.write(b);
        };
        feed(salt.as_bytes());
        for (path, e) in &self.entries {
            feed(path.as_bytes());
            match e {
                Entry::Dir => feed(b"d"),
                Entry::Symlink(t) => {
                    feed(b"l");
                    feed(t.as_bytes());
                }
                Entry::CharDev(a, b) => feed(format!("c{a}:{b}").as_bytes()),
                Entry::File(src, mode) => {
                    feed(format!("f{mode:o}").as_bytes());
                    match src {
                        Source::Bytes(b) => {
                            feed(&(b.len() as u64).to_le_bytes());
                            feed(b);
                        }
                        Source::Host(p) => {
                            let mut f = File::open(p)
                                .with_context(|| format!("opening {}", p.display()))?;
                            let mut buf = vec![0u8; 1 << 20];
                            let mut n_total = 0u64;
                            loop {
                                let n = f.read(&mut buf)?;
                                if n == 0 {
                                    break;
                                }
                                n_total += n as u64;
                                feed(&buf[..n]);
                            }
                            feed(&n_total.to_le_bytes());
                        }
                    }
                }
            }
        }
        Ok(format!("{:016x}{:016x}", h1.finish(), h2.finish()))
    }

    /// Writes the archive as cpio newc (all files root-owned, mtime 0).
    pub(super) fn write_cpio(&self, w: &mut impl Write) -> Result<()> {
        fn header(
            w: &mut impl Write,
            ino: u32,
            mode: u32,
            size: u32,
            rdev: (u32, u32),
            name: &str,
        ) -> Result<()> {
            let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
            write!(
                w,
                "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{size:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
                0,
                0,
                0,
                0,
                0,
                rdev.0,
                rdev.1,
                name.len() + 1,
                0
            )?;
            w.write_all(name.as_bytes())?;
            w.write_all(&[0])?;
            pad(w, 110 + name.len() + 1)
        }
        fn pad(w: &mut impl Write, len: usize) -> Result<()> {
            let n = (4 - len % 4) % 4;
            w.write_all(&[0u8; 3][..n])?;
            Ok(())
        }
        let mut ino = 1u32;
        for (path, e) in &self.entries {
            ino += 1;
            match e {
                Entry::Dir => header(w, ino, 0o040755, 0, (0, 0), path)?,
                Entry::CharDev(ma, mi) => header(w, ino, 0o020600, 0, (*ma, *mi), path)?,
                Entry::Symlink(t) => {
                    header(w, ino, 0o120777, t.len() as u32, (0, 0), path)?;
                    w.write_all(t.as_bytes())?;
                    pad(w, t.len())?;
                }
                Entry::File(src, mode) => {
                    let data = match src {
                        Source::Bytes(b) => std::borrow::Cow::Borrowed(b.as_slice()),
                        Source::Host(p) => std::borrow::Cow::Owned(
                            fs::read(p).with_context(|| format!("reading {}", p.display()))?,
                        ),
                    };
                    let size = u32::try_from(data.len()).map_err(|_| {
                        anyhow!("{path} is larger than 4 GiB, too big for cpio newc")
                    })?;
                    header(w, ino, 0o100000 | mode, size, (0, 0), path)?;
                    w.write_all(&data)?;
                    pad(w, data.len())?;
                }
            }
        }
        header(w, 0, 0, 0, (0, 0), "TRAILER!!!")?;
        Ok(())
    }
}
