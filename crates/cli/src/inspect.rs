//! `iopf inspect`: decodes a queue region from a file (a saved image, or a live memfd through
//! `/proc/PID/fd/N`) and prints its pages, indices, counters and the records not consumed yet:
//! ABI v2 has no producer index, so they are found by following the records' marks from the
//! consumer index, as a consumer would.

use std::io::Read;
use std::path::PathBuf;

use anyhow::{Context, bail};
use clap::Args;
use iopf_abi::{
    ENTRIES_OFFSET, FaultRecord, HostPageHeader, MAX_ENTRIES, QueueGeometry, QueueKind,
    ResponseRecord, VMM_PAGE_OFFSET, VmmPageHeader, mark,
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
    /// Print the region's fields and records (or, with --socket, the live view) as JSON.
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
    let view = inspect(&bytes, args.records)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&view)?);
    } else {
        print!("{view}");
    }
    Ok(())
}

/// What a region image holds, as `iopf inspect` prints it (text, or JSON with `--json`).
#[derive(Debug, serde::Serialize)]
pub struct RegionView {
    /// The host page.
    pub host: HostPageView,
    /// The VMM page.
    pub vmm: VmmPageView,
    /// Why the region's geometry or indices are invalid, if they are.
    pub invalid: Option<String>,
    /// The consumer index, the producer index and the records between them.
    pub records: Option<RecordsView>,
}

/// The host page's fields.
#[derive(Debug, serde::Serialize)]
pub struct HostPageView {
    magic: u32,
    version: u16,
    kind: String,
    entry_size: u32,
    nb_entries: u32,
    offset: u32,
    flags: u32,
    live: bool,
    need_wakeup: bool,
    index: u32,
    lost: u64,
    rejected: u64,
}

/// The VMM page's fields.
#[derive(Debug, serde::Serialize)]
pub struct VmmPageView {
    abi: u32,
    flags: u32,
    need_wakeup: bool,
    index: u32,
}

/// The records between the consumer index and the first slot not marked for its record.
#[derive(Debug, serde::Serialize)]
pub struct RecordsView {
    cons: u32,
    /// The first record not marked (the producer's position, as the marks show it).
    prod: u32,
    pending: u32,
    /// The mark found in the slot of record `prod`, when it is neither an empty slot's (0 or
    /// the previous pass's) nor `prod`'s: a ring its producer broke.
    bad_mark: Option<u64>,
    /// (index, the decoded record or why it does not decode), at most the `--records` limit.
    shown: Vec<(u32, String)>,
}

/// Decodes a region image; fails only if it is too small to hold the two pages.
pub fn inspect(bytes: &[u8], max_records: u32) -> anyhow::Result<RegionView> {
    let too_small = || {
        anyhow::anyhow!(
            "{} bytes: too small for a queue region (needs {ENTRIES_OFFSET})",
            bytes.len()
        )
    };
    let (Ok((host, _)), Some(vmm_bytes)) = (
        HostPageHeader::read_from_prefix(bytes),
        bytes.get(VMM_PAGE_OFFSET as usize..),
    ) else {
        return Err(too_small());
    };
    let Ok((vmm, _)) = VmmPageHeader::read_from_prefix(vmm_bytes) else {
        return Err(too_small());
    };
    let kind = QueueKind::from_raw(host.kind.get());
    let mut view = RegionView {
        host: HostPageView {
            magic: host.magic.get(),
            version: host.version.get(),
            kind: kind.map_or_else(
                |_| format!("{} (unknown)", host.kind.get()),
                |k| k.to_string(),
            ),
            entry_size: host.entry_size.get(),
            nb_entries: host.nb_entries.get(),
            offset: host.offset.get(),
            flags: host.flags.get(),
            live: host.flags.get() & iopf_abi::HOST_FLAG_LIVE != 0,
            need_wakeup: host.flags.get() & iopf_abi::FLAG_NEED_WAKEUP != 0,
            index: host.index.get(),
            lost: host.lost.get(),
            rejected: host.rejected.get(),
        },
        vmm: VmmPageView {
            abi: vmm.abi.get(),
            flags: vmm.flags.get(),
            need_wakeup: vmm.flags.get() & iopf_abi::FLAG_NEED_WAKEUP != 0,
            index: vmm.index.get(),
        },
        invalid: None,
        records: None,
    };
    let kind = match kind {
        Ok(kind) => kind,
        Err(e) => {
            view.invalid = Some(e.to_string());
            return Ok(view);
        }
    };
    let geometry = match QueueGeometry::from_host_header(&host, kind, bytes.len() as u64) {
        Ok(g) => g,
        Err(e) => {
            view.invalid = Some(format!("invalid region: {e}"));
            return Ok(view);
        }
    };
    let cons = match kind {
        QueueKind::Fault => vmm.index.get(),
        QueueKind::Response => host.index.get(),
    };
    let nb = geometry.nb_entries();
    let entry = |index: u32| {
        let offset = geometry.entry_offset(index) as usize;
        bytes.get(offset..offset + geometry.entry_size() as usize)
    };
    // The mark is the entry's last 8 bytes.
    let mark_of = |index: u32| {
        entry(index)
            .and_then(|e| e.last_chunk::<8>())
            .map_or(0, |m| u64::from_le_bytes(*m))
    };
    let mut pending = 0;
    while pending < nb && mark_of(cons.wrapping_add(pending)) == mark(cons.wrapping_add(pending)) {
        pending += 1;
    }
    let prod = cons.wrapping_add(pending);
    let found = mark_of(prod);
    let bad_mark =
        (pending < nb && found != 0 && found != mark(prod.wrapping_sub(nb))).then_some(found);
    if let Some(found) = bad_mark {
        view.invalid = Some(format!(
            "slot of record {prod} has mark {found:#x}: neither {:#x} (the record) nor an empty \
             slot's",
            mark(prod)
        ));
    }
    let shown = (0..pending.min(max_records))
        .map(|i| {
            let index = cons.wrapping_add(i);
            let line = match (kind, entry(index)) {
                (QueueKind::Fault, Some(e)) => FaultRecord::read_from_bytes(e)
                    .map(|r| format!("{:?}", r.decode()))
                    .unwrap_or_default(),
                (QueueKind::Response, Some(e)) => ResponseRecord::read_from_bytes(e)
                    .map(|r| format!("{:?}", r.decode()))
                    .unwrap_or_default(),
                (_, None) => String::new(),
            };
            (index, line)
        })
        .collect();
    view.records = Some(RecordsView {
        cons,
        prod,
        pending,
        bad_mark,
        shown,
    });
    Ok(view)
}

impl std::fmt::Display for RegionView {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let h = &self.host;
        let flag = |on: bool, name: &'static str| if on { name } else { "" };
        writeln!(
            out,
            "host page: magic {:#010x} version {} kind {} entry_size {} nb_entries {} offset {}",
            h.magic, h.version, h.kind, h.entry_size, h.nb_entries, h.offset,
        )?;
        writeln!(
            out,
            "           flags {:#x}{}{} index {} lost {} rejected {}",
            h.flags,
            flag(h.live, " LIVE"),
            flag(h.need_wakeup, " NEED_WAKEUP"),
            h.index,
            h.lost,
            h.rejected,
        )?;
        let v = &self.vmm;
        writeln!(
            out,
            "VMM page:  abi {} flags {:#x}{} index {}",
            v.abi,
            v.flags,
            flag(v.need_wakeup, " NEED_WAKEUP"),
            v.index,
        )?;
        if let Some(invalid) = &self.invalid {
            writeln!(out, "{invalid}")?;
        }
        if let Some(r) = &self.records {
            writeln!(
                out,
                "{} records marked between cons {} and prod {}:",
                r.pending, r.cons, r.prod
            )?;
            for (index, line) in &r.shown {
                writeln!(out, "  [{index}] {line}")?;
            }
            let more = r.pending as usize - r.shown.len();
            if more > 0 {
                writeln!(out, "  ... {more} more")?;
            }
        }
        Ok(())
    }
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
                version: iopf_abi::REGION_VERSION.into(),
                kind: kind.into(),
                entry_size: (if kind == 2 { 32 } else { 64 }).into(),
                nb_entries: (1u32 << nb_log).into(),
                offset: ENTRIES_OFFSET.into(),
                index: index.into(),
                ..HostPageHeader::default()
            };
            if bytes.len() >= 72 {
                bytes[..72].copy_from_slice(header.as_bytes());
            }
            if bytes.len() >= 4096 + 68 {
                bytes[4096 + 64..4096 + 68].copy_from_slice(&vmm_index.to_le_bytes());
            }
            let _ = inspect(&bytes, 1000).map(|view| view.to_string());
        }
    }
}
