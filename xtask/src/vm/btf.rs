//! Kernel BTF: the `.BTF` section of vmlinux decompressed from the bzImage,
//! or (fallback) `/sys/kernel/btf/vmlinux` dumped by a guest.

use anyhow::{Context, Result, anyhow, bail};
use base64::Engine as _;
use object::{Object, ObjectSection};
use std::fs::{self, File};
use std::path::Path;
use std::process::{Command, Stdio};

use super::VmOptions;
use super::accel::choose;
use super::apt::KernelPkg;
use super::host::Tools;
use super::init::{BTF_BEGIN, BTF_END, btf_init};
use super::initramfs::init_only_initrd;
use super::qemu::boot;

/// Checks the BTF header (magic 0xeb9f, version 1) and that the blob is exactly
/// header + type + string sections long.
pub fn validate_btf(data: &[u8]) -> Result<()> {
    if data.len() < 24 {
        bail!("BTF blob too short ({} bytes)", data.len());
    }
    let u32_at = |o: usize| u32::from_le_bytes(data[o..o + 4].try_into().unwrap()) as usize;
    if u16::from_le_bytes([data[0], data[1]]) != 0xeb9f {
        bail!("bad BTF magic {:02x}{:02x}", data[1], data[0]);
    }
    if data[2] != 1 {
        bail!("unsupported BTF version {}", data[2]);
    }
    let hdr = u32_at(4);
    let end = hdr + (u32_at(8) + u32_at(12)).max(u32_at(16) + u32_at(20));
    if end != data.len() {
        bail!("BTF blob is {} bytes, header says {end}", data.len());
    }
    Ok(())
}

const COMPRESSORS: &[(&[u8], &str)] = &[
    (&[0xfd, b'7', b'z', b'X', b'Z', 0x00], "xz"),
    (&[0x28, 0xb5, 0x2f, 0xfd], "zstd"),
    (&[0x1f, 0x8b, 0x08], "gzip"),
];

fn decompress_tool<'a>(tools: &'a Tools, kind: &str) -> &'a Path {
    match kind {
        "xz" => &tools.xz,
        "zstd" => &tools.zstd,
        _ => &tools.gzip,
    }
}

/// Decompresses `data` with the tool for `kind`; trailing bytes after the stream
/// make the tools complain, so a nonzero exit is fine as long as the output is ELF.
fn decompress(tools: &Tools, kind: &str, data: &[u8], work: &Path) -> Result<Vec<u8>> {
    let input = work.join("vmlinux.payload");
    let output = work.join("vmlinux.out");
    fs::write(&input, data)?;
    let out_f = File::create(&output)?;
    let mut cmd = Command::new(decompress_tool(tools, kind));
    if kind == "xz" {
        cmd.arg("--single-stream");
    }
    let st = cmd
        .arg("-dc")
        .arg(&input)
        .stdout(out_f)
        .stderr(Stdio::null())
        .status()
        .with_context(|| format!("running {kind}"))?;
    let result = fs::read(&output);
    let _ = fs::remove_file(&input);
    let _ = fs::remove_file(&output);
    let result = result?;
    if !result.starts_with(b"\x7fELF") {
        bail!("{kind} output is not an ELF file ({st})");
    }
    Ok(result)
}

/// vmlinux (ELF) from a bzImage: the payload location from the x86 boot header
/// (protocol >= 2.08), else a scan for compressor magics, trying each candidate
/// until one decompresses to ELF.
fn vmlinux_from_bzimage(tools: &Tools, image: &[u8], work: &Path) -> Result<Vec<u8>> {
    let mut errors = Vec::new();
    if image.len() > 0x250 && &image[0x202..0x206] == b"HdrS" {
        let version = u16::from_le_bytes([image[0x206], image[0x207]]);
        let setup_sects = match image[0x1f1] {
            0 => 4,
            n => n as usize,
        };
        let off = (setup_sects + 1) * 512
            + u32::from_le_bytes(image[0x248..0x24c].try_into().unwrap()) as usize;
        let len = u32::from_le_bytes(image[0x24c..0x250].try_into().unwrap()) as usize;
        if version >= 0x208 && len > 4 && off + len <= image.len() {
            // The build appends the decompressed size (4 bytes) to the stream.
            let payload = &image[off..off + len - 4];
            if let Some((_, kind)) = COMPRESSORS.iter().find(|(m, _)| payload.starts_with(m)) {
                match decompress(tools, kind, payload, work) {
                    Ok(v) => return Ok(v),
                    Err(e) => errors.push(format!("boot header payload: {e:#}")),
                }
            } else {
                errors.push(format!(
                    "boot header payload has unknown magic {:02x?}",
                    &payload[..payload.len().min(6)]
                ));
            }
        }
    }
    for (magic, kind) in COMPRESSORS {
        let mut pos = 0;
        let mut tries = 0;
        while let Some(i) = find(&image[pos..], magic) {
            let at = pos + i;
            tries += 1;
            if let Ok(v) = decompress(tools, kind, &image[at..], work) {
                return Ok(v);
            }
            pos = at + 1;
            if tries > 16 {
                break;
            }
        }
    }
    bail!(
        "no compressed vmlinux found in the bzImage ({})",
        errors.join("; ")
    )
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

/// The contents of section `name` of an ELF file.
fn elf_section<'a>(elf: &'a [u8], name: &str) -> Result<Option<&'a [u8]>> {
    let file = object::File::parse(elf).context("parsing vmlinux as ELF")?;
    match file.section_by_name(name) {
        None => Ok(None),
        Some(s) => Ok(Some(
            s.data()
                .with_context(|| format!("reading section {name}"))?,
        )),
    }
}

pub(super) fn btf_from_vmlinuz(tools: &Tools, vmlinuz: &Path, cache: &Path) -> Result<Vec<u8>> {
    let image = fs::read(vmlinuz).with_context(|| format!("reading {}", vmlinuz.display()))?;
    let work = cache.join("tmp");
    fs::create_dir_all(&work)?;
    let elf = vmlinux_from_bzimage(tools, &image, &work)?;
    let btf = elf_section(&elf, ".BTF")?.ok_or_else(|| anyhow!("vmlinux has no .BTF section"))?;
    validate_btf(btf)?;
    Ok(btf.to_vec())
}

pub(super) fn btf_from_guest(
    tools: &Tools,
    opts: &VmOptions,
    spec: &str,
    k: &KernelPkg,
) -> Result<Vec<u8>> {
    let (dir, initrd) = init_only_initrd(tools, opts, spec, k, "btf-dump", btf_init(&k.release))?;
    let accel = choose(tools, opts, spec, k)?;
    let o = boot(
        tools,
        opts,
        accel,
        spec,
        &k.vmlinuz,
        &initrd,
        &dir.join("console.log"),
        false,
    )?;
    let begin = o
        .lines
        .iter()
        .position(|l| l.contains(BTF_BEGIN))
        .ok_or_else(|| anyhow!("guest printed no BTF (no /sys/kernel/btf/vmlinux?)"))?;
    let expected: usize = o.lines[begin]
        .split(BTF_BEGIN)
        .nth(1)
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0);
    let mut text = String::new();
    for l in &o.lines[begin + 1..] {
        if l.contains(BTF_END) {
            break;
        }
        text.push_str(l.trim());
    }
    let data = base64_decode(&text)?;
    if expected != 0 && data.len() != expected {
        bail!(
            "guest BTF dump: got {} bytes, guest said {expected}",
            data.len()
        );
    }
    validate_btf(&data)?;
    Ok(data)
}

/// Decodes the guest's `base64` output (line breaks ignored).
fn base64_decode(s: &str) -> Result<Vec<u8>> {
    let text: String = s.chars().filter(|c| !c.is_ascii_whitespace()).collect();
    base64::engine::general_purpose::STANDARD
        .decode(text)
        .context("decoding the guest's base64 BTF dump")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64() {
        assert_eq!(base64_decode("aGVsbG8=").unwrap(), b"hello");
        assert_eq!(base64_decode("aGVsbG8h\naGk=").unwrap(), b"hello!hi");
        assert_eq!(base64_decode("YQ==").unwrap(), b"a");
    }
}
