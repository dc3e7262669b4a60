//! The records a vEVENTQ's file returns (Linux 6.15 and later), parsed without trusting them.
//!
//! A `read` returns whole entries, each an 8-byte `struct iommufd_vevent_header {u32 flags;
//! u32 sequence}` and, unless `flags` has `IOMMU_VEVENTQ_FLAG_LOST_EVENTS`, the queue type's
//! fixed-size event (32 bytes for an Arm SMMUv3 event record, 4 for the self-test's
//! `{u32 virt_id}`). The kernel numbers every event it reports, delivered or not, with a
//! sequence in `0..=i32::MAX` that wraps to 0. When the queue is full it drops the event and
//! appends (or moves to the tail) one data-less `LOST_EVENTS` header carrying the sequence of
//! the last dropped event. So:
//!
//! - an event whose sequence is `d` past the expected one means `d` events were lost before it;
//! - a `LOST_EVENTS` header with sequence `s` means every event from the expected one up to and
//!   including `s` was lost;
//! - the first sequence a new queue reports is 0.
//!
//! [`VeventParser`] turns a read's bytes into [`VeventEntry`]s with those counts and keeps the
//! expected sequence across reads. It refuses what the kernel never sends (a header cut short,
//! an event cut short, unknown flag bits, a sequence above `i32::MAX`) with a
//! [`VeventParseError`], after handing over the entries before it. It never panics and never
//! allocates.

use iopf_abi::{DecodeError, Fault, FaultReason, Pasid, Perm, UnrecoverableFault};
use iopf_queue::ChannelFault;
use thiserror::Error;

/// Bytes of `struct iommufd_vevent_header`.
pub const VEVENT_HEADER_SIZE: usize = 8;
/// `IOMMU_VEVENTQ_FLAG_LOST_EVENTS`.
pub const VEVENTQ_FLAG_LOST_EVENTS: u32 = 1;
/// Sequences run over `0..=SEQUENCE_MAX` and wrap to 0.
pub const SEQUENCE_MAX: u32 = i32::MAX as u32;

/// The vEVENTQ types this crate reads (`enum iommu_veventq_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VeventType {
    /// `IOMMU_VEVENTQ_TYPE_ARM_SMMUV3`: 32-byte SMMUv3 event records whose `StreamID` is the
    /// vDevice's virtual ID.
    ArmSmmuV3,
    /// `IOMMU_VEVENTQ_TYPE_SELFTEST` (0xbeefbeef) of `CONFIG_IOMMUFD_TEST`'s mock vIOMMU: a
    /// 4-byte `{u32 virt_id}`.
    Selftest,
}

impl VeventType {
    /// The type's `enum iommu_veventq_type` value.
    pub const fn raw(self) -> u32 {
        match self {
            Self::ArmSmmuV3 => 1,
            Self::Selftest => 0xbeef_beef,
        }
    }

    /// Bytes of one event of this type (after its header).
    pub const fn event_size(self) -> usize {
        match self {
            Self::ArmSmmuV3 => 32,
            Self::Selftest => 4,
        }
    }

    /// The unrecoverable fault an event of this type reports, and the virtual device ID it
    /// names. `data` must be [`event_size`](Self::event_size) bytes (the parser guarantees it);
    /// anything else is a decode error, never a panic.
    pub fn to_channel_fault(self, data: &[u8]) -> ChannelFault {
        match self {
            Self::Selftest => {
                // `__u32 virt_id`, native-endian like every uapi field not marked `le`.
                let virt_id = ne_u32(data, 0).unwrap_or(0);
                ChannelFault {
                    device: virt_id,
                    fault: Ok(Fault::Unrecoverable(UnrecoverableFault {
                        reason: FaultReason::Unknown,
                        pasid: None,
                        perm: Perm::empty(),
                        addr: None,
                        fetch_addr: None,
                    })),
                }
            }
            Self::ArmSmmuV3 => smmuv3_fault(data),
        }
    }
}

fn le_u64(data: &[u8], at: usize) -> Option<u64> {
    let bytes = data.get(at..at.checked_add(8)?)?;
    Some(u64::from_le_bytes(bytes.try_into().ok()?))
}

/// An SMMUv3 event record (little-endian, 4 × u64) as an ABI v2 unrecoverable fault, its
/// `StreamID` as the device.
fn smmuv3_fault(data: &[u8]) -> ChannelFault {
    let (Some(w0), Some(w1), Some(w2)) = (le_u64(data, 0), le_u64(data, 8), le_u64(data, 16))
    else {
        // Only reachable with fewer than 24 bytes, which the parser never hands over.
        return ChannelFault {
            device: 0,
            fault: Err(DecodeError::UnknownFaultType(0)),
        };
    };
    let id = (w0 & 0xff) as u8;
    let device = (w0 >> 32) as u32;
    let ssv = w0 & (1 << 11) != 0;
    let ssid = ((w0 >> 12) & 0xf_ffff) as u32;
    let pasid = if ssv { Pasid::new(ssid).ok() } else { None };
    let reason = match id {
        0x08 => FaultReason::PasidInvalid,             // C_BAD_SUBSTREAMID
        0x09 => FaultReason::PasidFetch,               // F_CD_FETCH
        0x0a => FaultReason::BadPasidEntry,            // C_BAD_CD
        0x10 => FaultReason::PteFetch,                 // F_TRANSLATION
        0x11 => FaultReason::OutOfRangeAddress,        // F_ADDR_SIZE
        0x12 => FaultReason::Access,                   // F_ACCESS
        0x13 => FaultReason::Permission,               // F_PERMISSION
        0x03 | 0x25 => FaultReason::WalkExternalAbort, // F_STE_FETCH, F_VMS_FETCH
        _ => FaultReason::Unknown,                     // C_BAD_STE, F_STREAM_DISABLED, others
    };
    // Only the translation faults (0x10..=0x13) carry the access and its address.
    let (perm, addr) = if (0x10..=0x13).contains(&id) {
        let mut perm = if w1 & (1 << 35) != 0 {
            Perm::READ
        } else {
            Perm::WRITE
        };
        if w1 & (1 << 34) != 0 {
            perm |= Perm::EXEC;
        }
        if w1 & (1 << 33) != 0 {
            perm |= Perm::PRIV;
        }
        (perm, Some(w2))
    } else {
        (Perm::empty(), None)
    };
    ChannelFault {
        device,
        fault: Ok(Fault::Unrecoverable(UnrecoverableFault {
            reason,
            pasid,
            perm,
            addr,
            fetch_addr: None,
        })),
    }
}

/// One entry of a vEVENTQ read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VeventEntry<'a> {
    /// A delivered event.
    Event {
        /// Its sequence.
        sequence: u32,
        /// Events lost right before it (its sequence was ahead of the expected one).
        lost_before: u32,
        /// The type's event bytes.
        data: &'a [u8],
    },
    /// A `LOST_EVENTS` header: the queue overflowed.
    Lost {
        /// The sequence of the last event lost.
        sequence: u32,
        /// How many events were lost (from the expected sequence to this one).
        lost: u32,
    },
}

/// A read the kernel would never return.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Error)]
pub enum VeventParseError {
    /// Fewer than 8 bytes left for a header.
    #[error("vEVENTQ read: {left} bytes at offset {offset}, too few for a header")]
    TruncatedHeader {
        /// Where the header starts.
        offset: usize,
        /// Bytes left there.
        left: usize,
    },
    /// An event's header without all of its bytes.
    #[error(
        "vEVENTQ read: event at offset {offset} needs {need} bytes after its header, has {left}"
    )]
    TruncatedEvent {
        /// Where the header starts.
        offset: usize,
        /// The type's event size.
        need: usize,
        /// Bytes left after the header.
        left: usize,
    },
    /// Header flags other than `LOST_EVENTS`.
    #[error("vEVENTQ read: header at offset {offset} has unknown flags {flags:#x}")]
    UnknownFlags {
        /// Where the header starts.
        offset: usize,
        /// The flags.
        flags: u32,
    },
    /// A sequence above `i32::MAX`.
    #[error("vEVENTQ read: header at offset {offset} has sequence {sequence:#x} above i32::MAX")]
    SequenceOutOfRange {
        /// Where the header starts.
        offset: usize,
        /// The sequence.
        sequence: u32,
    },
}

/// What a [`VeventParser`] has seen.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VeventCounts {
    /// Events delivered.
    pub events: u64,
    /// Events lost (sequence gaps and `LOST_EVENTS` headers), never hidden.
    pub lost: u64,
    /// `LOST_EVENTS` headers read.
    pub lost_markers: u64,
    /// Reads refused as malformed.
    pub malformed: u64,
}

/// Parses vEVENTQ reads of one queue, keeping the expected sequence across reads.
#[derive(Debug, Clone)]
pub struct VeventParser {
    event_size: usize,
    next_sequence: u32,
    counts: VeventCounts,
}

impl VeventParser {
    /// A parser for a new queue of `kind` (whose first sequence is 0).
    pub fn new(kind: VeventType) -> Self {
        Self::with_event_size(kind.event_size())
    }

    /// A parser for events of `event_size` bytes (for types this crate does not name).
    pub fn with_event_size(event_size: usize) -> Self {
        Self {
            event_size,
            next_sequence: 0,
            counts: VeventCounts::default(),
        }
    }

    /// The sequence the next entry should carry.
    pub fn next_sequence(&self) -> u32 {
        self.next_sequence
    }

    /// What was seen so far.
    pub fn counts(&self) -> VeventCounts {
        self.counts
    }

    /// Parses the bytes one `read` returned, handing each entry to `f` in order. Returns how
    /// many entries; on a malformed entry, the error, after the entries before it.
    pub fn parse(
        &mut self,
        bytes: &[u8],
        f: &mut dyn FnMut(VeventEntry<'_>),
    ) -> Result<usize, VeventParseError> {
        let result = self.parse_inner(bytes, f);
        if result.is_err() {
            self.counts.malformed += 1;
        }
        result
    }

    fn parse_inner(
        &mut self,
        bytes: &[u8],
        f: &mut dyn FnMut(VeventEntry<'_>),
    ) -> Result<usize, VeventParseError> {
        let mut offset = 0;
        let mut entries = 0;
        while offset < bytes.len() {
            let left = bytes.len() - offset;
            let (Some(flags), Some(sequence)) = (ne_u32(bytes, offset), ne_u32(bytes, offset + 4))
            else {
                return Err(VeventParseError::TruncatedHeader { offset, left });
            };
            if flags & !VEVENTQ_FLAG_LOST_EVENTS != 0 {
                return Err(VeventParseError::UnknownFlags { offset, flags });
            }
            if sequence > SEQUENCE_MAX {
                return Err(VeventParseError::SequenceOutOfRange { offset, sequence });
            }
            let gap = sequence.wrapping_sub(self.next_sequence) & SEQUENCE_MAX;
            if flags & VEVENTQ_FLAG_LOST_EVENTS != 0 {
                // Every event up to and including `sequence` was lost.
                let lost = gap.saturating_add(1);
                self.counts.lost += u64::from(lost);
                self.counts.lost_markers += 1;
                self.next_sequence = sequence.wrapping_add(1) & SEQUENCE_MAX;
                offset += VEVENT_HEADER_SIZE;
                f(VeventEntry::Lost { sequence, lost });
            } else {
                let start = offset + VEVENT_HEADER_SIZE;
                let data = bytes
                    .get(start..)
                    .and_then(|rest| rest.get(..self.event_size))
                    .ok_or(VeventParseError::TruncatedEvent {
                        offset,
                        need: self.event_size,
                        left: left - VEVENT_HEADER_SIZE,
                    })?;
                self.counts.lost += u64::from(gap);
                self.counts.events += 1;
                self.next_sequence = sequence.wrapping_add(1) & SEQUENCE_MAX;
                offset = start + self.event_size;
                f(VeventEntry::Event {
                    sequence,
                    lost_before: gap,
                    data,
                });
            }
            entries += 1;
        }
        Ok(entries)
    }
}

/// The header's fields are native-endian `__u32`s.
fn ne_u32(data: &[u8], at: usize) -> Option<u32> {
    let bytes = data.get(at..at.checked_add(4)?)?;
    Some(u32::from_ne_bytes(bytes.try_into().ok()?))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(flags: u32, sequence: u32) -> Vec<u8> {
        let mut v = flags.to_ne_bytes().to_vec();
        v.extend_from_slice(&sequence.to_ne_bytes());
        v
    }

    fn event(sequence: u32, virt_id: u32) -> Vec<u8> {
        let mut v = header(0, sequence);
        v.extend_from_slice(&virt_id.to_ne_bytes());
        v
    }

    fn parse_all(
        p: &mut VeventParser,
        bytes: &[u8],
    ) -> (Vec<String>, Result<usize, VeventParseError>) {
        let mut seen = Vec::new();
        let r = p.parse(bytes, &mut |e| {
            seen.push(match e {
                VeventEntry::Event {
                    sequence,
                    lost_before,
                    data,
                } => format!("ev{sequence}/{lost_before}/{}", data.len()),
                VeventEntry::Lost { sequence, lost } => format!("lost{sequence}/{lost}"),
            })
        });
        (seen, r)
    }

    #[test]
    fn events_in_order_lose_nothing() {
        let mut p = VeventParser::new(VeventType::Selftest);
        let bytes = [event(0, 0x99), event(1, 0x99), event(2, 0x99)].concat();
        let (seen, r) = parse_all(&mut p, &bytes);
        assert_eq!(r, Ok(3));
        assert_eq!(seen, ["ev0/0/4", "ev1/0/4", "ev2/0/4"]);
        assert_eq!(p.counts().lost, 0);
        assert_eq!(p.next_sequence(), 3);
    }

    /// The kernel's overflow: depth 2, five events reported: 0 and 1 queued, 2..=4 dropped,
    /// one LOST header with sequence 4; the next event is 5.
    #[test]
    fn an_overflow_counts_every_lost_event_including_the_headers_own() {
        let mut p = VeventParser::new(VeventType::Selftest);
        let bytes = [event(0, 1), event(1, 1), header(1, 4)].concat();
        let (seen, r) = parse_all(&mut p, &bytes);
        assert_eq!(r, Ok(3));
        assert_eq!(seen, ["ev0/0/4", "ev1/0/4", "lost4/3"]);
        assert_eq!(p.counts().lost, 3);
        assert_eq!(p.counts().lost_markers, 1);
        let (seen, _) = parse_all(&mut p, &event(5, 1));
        assert_eq!(seen, ["ev5/0/4"]);
        assert_eq!(p.counts().lost, 3);
    }

    #[test]
    fn a_gap_between_events_is_counted_and_sequences_wrap() {
        let mut p = VeventParser::new(VeventType::Selftest);
        let (seen, _) = parse_all(&mut p, &[event(3, 1), event(6, 1)].concat());
        assert_eq!(seen, ["ev3/3/4", "ev6/2/4"]);
        assert_eq!(p.counts().lost, 5);
        let mut p = VeventParser::new(VeventType::Selftest);
        p.next_sequence = SEQUENCE_MAX;
        let (seen, _) = parse_all(&mut p, &[event(SEQUENCE_MAX, 1), event(0, 1)].concat());
        assert_eq!(
            seen,
            [format!("ev{SEQUENCE_MAX}/0/4"), "ev0/0/4".to_string()]
        );
        assert_eq!(p.counts().lost, 0);
    }

    #[test]
    fn malformed_reads_are_refused_after_the_good_entries() {
        let mut p = VeventParser::new(VeventType::Selftest);
        let mut bytes = event(0, 1);
        bytes.extend_from_slice(&[1, 2, 3]);
        let (seen, r) = parse_all(&mut p, &bytes);
        assert_eq!(seen, ["ev0/0/4"]);
        assert_eq!(
            r,
            Err(VeventParseError::TruncatedHeader {
                offset: 12,
                left: 3
            })
        );
        let (_, r) = parse_all(&mut p, &header(0, 1));
        assert!(matches!(
            r,
            Err(VeventParseError::TruncatedEvent {
                need: 4,
                left: 0,
                ..
            })
        ));
        let (_, r) = parse_all(&mut p, &header(2, 1));
        assert!(matches!(
            r,
            Err(VeventParseError::UnknownFlags { flags: 2, .. })
        ));
        let (_, r) = parse_all(&mut p, &header(0, 0x8000_0000));
        assert!(matches!(
            r,
            Err(VeventParseError::SequenceOutOfRange { .. })
        ));
        assert_eq!(p.counts().malformed, 4);
        assert_eq!(p.counts().events, 1);
    }

    /// An SMMUv3 event record of four words, as the vEVENTQ carries it (little-endian).
    fn smmuv3_fault_of(words: [u64; 4]) -> ChannelFault {
        let data: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        VeventType::ArmSmmuV3.to_channel_fault(&data)
    }

    /// Each SMMUv3 event id maps to its reason; only the translation faults carry an address.
    #[test]
    fn smmuv3_event_ids_map_to_their_reasons() {
        let cases = [
            (0x03, FaultReason::WalkExternalAbort, false),
            (0x08, FaultReason::PasidInvalid, false),
            (0x09, FaultReason::PasidFetch, false),
            (0x0a, FaultReason::BadPasidEntry, false),
            (0x10, FaultReason::PteFetch, true),
            (0x11, FaultReason::OutOfRangeAddress, true),
            (0x12, FaultReason::Access, true),
            (0x13, FaultReason::Permission, true),
            (0x25, FaultReason::WalkExternalAbort, false),
            (0x04, FaultReason::Unknown, false),
        ];
        for (id, reason, has_addr) in cases {
            match smmuv3_fault_of([(7u64 << 32) | id, 1 << 35, 0x1000, 0]).fault {
                Ok(Fault::Unrecoverable(f)) => {
                    assert_eq!(f.reason, reason, "event id {id:#x}");
                    assert_eq!(f.addr.is_some(), has_addr, "event id {id:#x}");
                }
                other => panic!("event id {id:#x}: {other:?}"),
            }
        }
    }

    #[test]
    fn smmuv3_translation_fault_carries_sid_ssid_access_and_address() {
        let w0: u64 = (0x42u64 << 32) | (0x5u64 << 12) | (1 << 11) | 0x10;
        let w1: u64 = (1 << 35) | (1 << 33);
        let f = smmuv3_fault_of([w0, w1, 0xdead_b000, 0]);
        assert_eq!(f.device, 0x42);
        assert_eq!(
            f.fault,
            Ok(Fault::Unrecoverable(UnrecoverableFault {
                reason: FaultReason::PteFetch,
                pasid: Some(Pasid::new(5).unwrap()),
                perm: Perm::READ | Perm::PRIV,
                addr: Some(0xdead_b000),
                fetch_addr: None,
            }))
        );
        // A write (bit 35 clear) that fetched an instruction (bit 34), without a substream.
        let w0: u64 = (0x43u64 << 32) | (0x5u64 << 12) | 0x13;
        let f = smmuv3_fault_of([w0, 1 << 34, 0x7000, 0]);
        assert_eq!(f.device, 0x43);
        assert_eq!(
            f.fault,
            Ok(Fault::Unrecoverable(UnrecoverableFault {
                reason: FaultReason::Permission,
                pasid: None,
                perm: Perm::WRITE | Perm::EXEC,
                addr: Some(0x7000),
                fetch_addr: None,
            }))
        );
        let f = VeventType::Selftest.to_channel_fault(&0x99u32.to_le_bytes());
        assert_eq!(f.device, 0x99);
        assert!(
            VeventType::ArmSmmuV3
                .to_channel_fault(&[0; 3])
                .fault
                .is_err()
        );
    }
}
