//! vEVENTQ record parsing (`iopf-iommufd`'s `VeventParser`) on whatever a read might return:
//! short reads, headers cut short, events cut short, unknown flags, sequences out of range or
//! with gaps, loss markers anywhere. Whatever happens, nothing panics; the entries handed over
//! lie inside the read and have the type's size; the counters agree with the entries (every
//! gap and every loss marker counted, never hidden); and the sequence expected next follows
//! the last entry.
#![no_main]

use arbitrary::Arbitrary;
use iopf_iommufd::{
    SEQUENCE_MAX, VEVENT_HEADER_SIZE, VEVENTQ_FLAG_LOST_EVENTS, VeventEntry, VeventParser,
    VeventType,
};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
enum Piece {
    /// A well-formed event (`sequence` masked into range).
    Event { sequence: u32, byte: u8 },
    /// A well-formed loss marker.
    Lost { sequence: u32 },
    /// A header with any flags and sequence, and any bytes after it.
    Header { flags: u32, sequence: u32 },
    /// Raw bytes (short reads, lying lengths).
    Raw(Vec<u8>),
}

#[derive(Debug, Arbitrary)]
struct Input {
    smmu: bool,
    /// Each read: its pieces, then cut to at most `cut` bytes if set.
    reads: Vec<(Vec<Piece>, Option<u16>)>,
}

fn header(out: &mut Vec<u8>, flags: u32, sequence: u32) {
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&sequence.to_ne_bytes());
}

fuzz_target!(|input: Input| {
    let kind = if input.smmu {
        VeventType::ArmSmmuV3
    } else {
        VeventType::Selftest
    };
    let size = kind.event_size();
    let mut parser = VeventParser::new(kind);
    for (pieces, cut) in input.reads.iter().take(64) {
        let mut bytes = Vec::new();
        for piece in pieces.iter().take(256) {
            match piece {
                Piece::Event { sequence, byte } => {
                    header(&mut bytes, 0, sequence & SEQUENCE_MAX);
                    bytes.extend(std::iter::repeat_n(*byte, size));
                }
                Piece::Lost { sequence } => {
                    header(&mut bytes, VEVENTQ_FLAG_LOST_EVENTS, sequence & SEQUENCE_MAX)
                }
                Piece::Header { flags, sequence } => header(&mut bytes, *flags, *sequence),
                Piece::Raw(raw) => bytes.extend(raw.iter().take(64)),
            }
        }
        if let Some(cut) = cut {
            bytes.truncate(usize::from(*cut));
        }
        let before = parser.counts();
        let range = bytes.as_ptr_range();
        let (mut events, mut markers, mut lost, mut last) = (0u64, 0u64, 0u64, None);
        let result = parser.parse(&bytes, &mut |entry| match entry {
            VeventEntry::Event {
                sequence,
                lost_before,
                data,
            } => {
                assert_eq!(data.len(), size);
                assert!(data.is_empty() || range.contains(&data.as_ptr()));
                assert!(sequence <= SEQUENCE_MAX);
                events += 1;
                lost += u64::from(lost_before);
                last = Some(sequence);
                // The event's data converts without panicking.
                let _ = kind.to_channel_fault(data);
            }
            VeventEntry::Lost { sequence, lost: n } => {
                assert!(sequence <= SEQUENCE_MAX);
                assert!(n >= 1, "a loss marker counts at least its own event");
                markers += 1;
                lost += u64::from(n);
                last = Some(sequence);
            }
        });
        let after = parser.counts();
        assert_eq!(after.events - before.events, events);
        assert_eq!(after.lost_markers - before.lost_markers, markers);
        assert_eq!(after.lost - before.lost, lost);
        assert_eq!(after.malformed - before.malformed, u64::from(result.is_err()));
        if let Ok(n) = result {
            assert_eq!(n as u64, events + markers);
            // A clean read is consumed exactly: nothing is skipped.
            assert!(bytes.len() as u64 >= (events + markers) * VEVENT_HEADER_SIZE as u64);
        }
        if let Some(last) = last {
            assert_eq!(parser.next_sequence(), (last + 1) & SEQUENCE_MAX);
        }
    }
});
