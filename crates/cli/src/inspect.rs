//! `iopf inspect`: decodes a queue region from a file (a saved image, or a live memfd through
//! `/proc/PID/fd/N`) and prints its pages, indices, counters and the records between the
//! consumer and producer indices.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use iopf_abi::{
    ENTRIES_OFFSET, FaultRecord, HostPageHeader, MAX_ENTRIES, QueueGeometry, QueueKind,
    ResponseRecord, VMM_PAGE_OFFSET, VmmPageHeader,
};
use zerocopy::FromBytes;

/// Options of `iopf inspect`.
#[derive(Debug, Args)]
pub struct InspectArgs {
    /// The region: a saved image, or a live memfd (`/proc/PID/fd/N`).
    #[arg(required_unless_present = "socket")]
    file: Option<PathBuf>,
    /// Print at most this many records.
    #[arg(long, default_value_t = 32)]
    records: u32,
    /// Instead of a region: the vfio-user socket of a running `iopf host`; prints its live view
    /// once (per device: counters, pending groups, queue state, round-trip latency), read
    /// from the stats socket next to it (`SOCKET.stats`).
    #[arg(long, conflicts_with = "file")]
    socket: Option<PathBuf>,
    /// With --socket: print the live view as JSON.
    #[arg(long)]
    json: bool,
}

pub fn main(args: InspectArgs) -> anyhow::Result<()> {
    if let Some(socket) = &args.socket {
        let path = iopf_host::metrics::stats_socket_path(socket);
        let snapshot = iopf_host::metrics::read_stats(&path)
            .with_context(|| format!("inspect the host serving {}", socket.display()))?;
        if args.json {
            println!("{}", serde_json::to_string_pretty(&snapshot)?);
        } else {
            print!("{snapshot}");
        }
        return Ok(());
    }
    if args.json {
        bail!("--json goes with --socket (a region is described as text only)");
    }
    let Some(file) = &args.file else {
        bail!("give a region file, or --socket PATH");
    };
    // The largest valid region is a fault queue of 65536 entries; read one byte more to tell
    // an oversized file from a valid one without reading all of it.
    let limit = QueueGeometry::new(QueueKind::Fault, MAX_ENTRIES)?.region_len();
    let mut bytes = Vec::new();
    std::fs::File::open(file)
        .with_context(|| format!("open {}", file.display()))?
        .take(limit + 1)
        .read_to_end(&mut bytes)
        .with_context(|| format!("read {}", file.display()))?;
    print!("{}", describe(&bytes, args.records)?);
    Ok(())
}

/// The human description of a region image.
pub fn describe(bytes: &[u8], max_records: u32) -> anyhow::Result<String> {
    use std::fmt::Write;
    let mut out = String::new();
    let (Ok((host, _)), Some(vmm_bytes)) = (
        HostPageHeader::read_from_prefix(bytes),
        bytes.get(VMM_PAGE_OFFSET as usize..),
    ) else {
        bail!(
            "{} bytes: too small for a queue region (needs {ENTRIES_OFFSET})",
            bytes.len()
        );
    };
    let Ok((vmm, _)) = VmmPageHeader::read_from_prefix(vmm_bytes) else {
        bail!(
            "{} bytes: too small for a queue region (needs {ENTRIES_OFFSET})",
            bytes.len()
        );
    };
    let kind = QueueKind::from_raw(host.kind.get());
    writeln!(
        out,
        "host page: magic {:#010x} version {} kind {} entry_size {} nb_entries {} offset {}",
        host.magic.get(),
        host.version.get(),
        kind.map_or_else(
            |_| format!("{} (unknown)", host.kind.get()),
            |k| k.to_string()
        ),
        host.entry_size.get(),
        host.nb_entries.get(),
        host.offset.get(),
    )?;
    writeln!(
        out,
        "           flags {:#x}{}{} index {} lost {} rejected {}",
        host.flags.get(),
        if host.flags.get() & iopf_abi::HOST_FLAG_LIVE != 0 {
            " LIVE"
        } else {
            ""
        },
        if host.flags.get() & iopf_abi::FLAG_NEED_WAKEUP != 0 {
            " NEED_WAKEUP"
        } else {
            ""
        },
        host.index.get(),
        host.lost.get(),
        host.rejected.get(),
    )?;
    writeln!(
        out,
        "VMM page:  abi {} flags {:#x}{} index {}",
        vmm.abi.get(),
        vmm.flags.get(),
        if vmm.flags.get() & iopf_abi::FLAG_NEED_WAKEUP != 0 {
            " NEED_WAKEUP"
        } else {
            ""
        },
        vmm.index.get(),
    )?;
    let kind = kind?;
    let geometry = match QueueGeometry::from_host_header(&host, kind, bytes.len() as u64) {
        Ok(g) => g,
        Err(e) => {
            writeln!(out, "invalid region: {e}")?;
            return Ok(out);
        }
    };
    let (cons, prod) = match kind {
        QueueKind::Fault => (vmm.index.get(), host.index.get()),
        QueueKind::Response => (host.index.get(), vmm.index.get()),
    };
    let pending = prod.wrapping_sub(cons);
    if pending > geometry.nb_entries() {
        writeln!(
            out,
            "indices inconsistent: prod {prod} - cons {cons} = {pending} > {} entries",
            geometry.nb_entries()
        )?;
        return Ok(out);
    }
    writeln!(
        out,
        "{pending} records between cons {cons} and prod {prod}:"
    )?;
    for i in 0..pending.min(max_records) {
        let index = cons.wrapping_add(i);
        let offset = geometry.entry_offset(index) as usize;
        let entry = &bytes[offset..offset + geometry.entry_size() as usize];
        let line = match kind {
            QueueKind::Fault => FaultRecord::read_from_bytes(entry)
                .map(|r| format!("{:?}", r.decode()))
                .unwrap_or_default(),
            QueueKind::Response => ResponseRecord::read_from_bytes(entry)
                .map(|r| format!("{:?}", r.decode()))
                .unwrap_or_default(),
        };
        writeln!(out, "  [{index}] {line}")?;
    }
    if pending > max_records {
        writeln!(out, "  ... {} more", pending - max_records)?;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use zerocopy::IntoBytes;

    use super::*;

    proptest! {
        /// Whatever a region image holds, describing it never panics or reads out of bounds.
        #[test]
        fn any_image_is_described_or_refused(
            kind in 0u16..4,
            nb_log in 0u32..8,
            index in any::<u32>(),
            vmm_index in any::<u32>(),
            len in 0usize..20_000,
            noise in any::<u64>(),
        ) {
            let mut bytes: Vec<u8> = (0..len).map(|i| (noise.rotate_left(i as u32 % 64) >> 7) as u8).collect();
            let header = HostPageHeader {
                magic: iopf_abi::REGION_MAGIC.into(),
                version: 1.into(),
                kind: kind.into(),
                entry_size: (if kind == 2 { 32 } else { 64 }).into(),
                nb_entries: (1u32 << nb_log).into(),
                offset: ENTRIES_OFFSET.into(),
                index: index.into(),
                ..HostPageHeader::default()
            };
            if bytes.len() >= 48 {
                bytes[..48].copy_from_slice(header.as_bytes());
            }
            if bytes.len() >= 4096 + 12 {
                bytes[4096 + 8..4096 + 12].copy_from_slice(&vmm_index.to_le_bytes());
            }
            let _ = describe(&bytes, 1000);
        }
    }
}
