//! The queue region (`docs/DESIGN.md` §3.1): geometry, host page header checks, and the
//! offset of each entry under free-running indices.

use iopf_abi::{
    ENTRIES_OFFSET, FLAG_NEED_WAKEUP, HOST_FLAG_LIVE, HOST_PAGE_OFFSET, HostPageHeader,
    MAX_ENTRIES, MIN_ENTRIES, PAGE_SIZE, QueueGeometry, QueueKind, REGION_MAGIC, REGION_VERSION,
    RegionError, VMM_ABI, VMM_PAGE_OFFSET, VmmPageHeader,
};
use proptest::prelude::*;
use zerocopy::{FromBytes, IntoBytes};

fn le16(bytes: &[u8], off: usize) -> u16 {
    u16::from_le_bytes(bytes[off..off + 2].try_into().unwrap())
}

fn le32(bytes: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap())
}

fn le64(bytes: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
}

fn geometry(kind: QueueKind, nb_entries: u32) -> QueueGeometry {
    QueueGeometry::new(kind, nb_entries).unwrap()
}

/// A fault queue of 256 entries: its geometry and the header a host writes for it.
fn fault_queue() -> (QueueGeometry, HostPageHeader) {
    let g = geometry(QueueKind::Fault, 256);
    (g, g.host_header())
}

/// Checks `header` as a fault queue in a region exactly as large as 256 fault entries need.
fn check_fault_header(header: &HostPageHeader) -> Result<QueueGeometry, RegionError> {
    let len = geometry(QueueKind::Fault, 256).region_len();
    QueueGeometry::from_host_header(header, QueueKind::Fault, len)
}

fn is_valid_count(n: u32) -> bool {
    n.is_power_of_two() && (2..=65536).contains(&n)
}

fn any_kind() -> impl Strategy<Value = QueueKind> {
    prop_oneof![Just(QueueKind::Fault), Just(QueueKind::Response)]
}

fn any_geometry() -> impl Strategy<Value = QueueGeometry> {
    (any_kind(), 1u32..=16).prop_map(|(kind, shift)| geometry(kind, 1 << shift))
}

/// Any u32, with the powers of two and their neighbours drawn often.
fn entry_count() -> impl Strategy<Value = u32> {
    prop_oneof![
        any::<u32>(),
        (0u32..32).prop_map(|s| 1 << s),
        (0u32..32).prop_map(|s| (1u32 << s).wrapping_sub(1)),
        (0u32..32).prop_map(|s| (1u32 << s).wrapping_add(1)),
    ]
}

/// The header bytes of a valid region, its geometry and the region's length, with up to three
/// header bytes overwritten: some are still accepted (and must then be exactly what the
/// geometry encodes, plus the live fields), most are refused.
fn mutated_header() -> impl Strategy<Value = ([u8; 72], QueueGeometry, u64)> {
    (
        any_geometry(),
        proptest::collection::vec((0usize..72, any::<u8>()), 0..=3),
        0u64..=1 << 20,
    )
        .prop_map(|(g, edits, extra_len)| {
            let mut bytes = [0u8; 72];
            bytes.copy_from_slice(g.host_header().as_bytes());
            for (at, value) in edits {
                bytes[at] = value;
            }
            (bytes, g, g.region_len() + extra_len)
        })
}

/// What a host writes for `g`, with the fields that change while the queue lives (flags,
/// index, counters) taken from `live`.
fn encode_with_live_fields(g: QueueGeometry, live: &HostPageHeader) -> HostPageHeader {
    HostPageHeader {
        flags: live.flags,
        index: live.index,
        lost: live.lost,
        rejected: live.rejected,
        ..g.host_header()
    }
}

// ---- constants and layout ----------------------------------------------------------------

#[test]
fn magic_is_the_bytes_iopf() {
    assert_eq!(REGION_MAGIC, 0x4650_4F49);
    assert_eq!(&REGION_MAGIC.to_le_bytes(), b"IOPF");
}

#[test]
fn region_is_a_host_page_a_vmm_page_then_entries_at_8192() {
    assert_eq!(PAGE_SIZE, 4096);
    assert_eq!(HOST_PAGE_OFFSET, 0);
    assert_eq!(VMM_PAGE_OFFSET, 4096);
    assert_eq!(ENTRIES_OFFSET, 8192);
    assert_eq!((MIN_ENTRIES, MAX_ENTRIES), (2, 65536));
    assert_eq!(REGION_VERSION, 2);
    assert_eq!(VMM_ABI, 2);
    assert_eq!(iopf_abi::INDEX_OFFSET, 64);
}

#[test]
fn header_flags_are_live_bit_0_and_need_wakeup_bit_1() {
    assert_eq!(HOST_FLAG_LIVE, 1);
    assert_eq!(FLAG_NEED_WAKEUP, 2);
}

#[test]
fn header_sizes_are_72_and_68_bytes_with_the_index_in_the_second_line() {
    assert_eq!(core::mem::size_of::<HostPageHeader>(), 72);
    assert_eq!(core::mem::size_of::<VmmPageHeader>(), 68);
    assert_eq!(core::mem::offset_of!(HostPageHeader, index), 64);
    assert_eq!(core::mem::offset_of!(VmmPageHeader, index), 64);
}

#[test]
fn marks_are_the_index_with_bit_32_set() {
    assert_eq!(iopf_abi::MARK_VALID, 1 << 32);
    assert_eq!(iopf_abi::mark(0), 0x1_0000_0000);
    assert_eq!(iopf_abi::mark(u32::MAX), 0x1_FFFF_FFFF);
    // A zeroed slot never carries a valid mark, whatever the index.
    assert_ne!(iopf_abi::mark(0), 0);
}

#[test]
fn queue_kinds_are_1_fault_and_2_response() {
    assert_eq!(QueueKind::Fault as u16, 1);
    assert_eq!(QueueKind::Response as u16, 2);
    assert_eq!(QueueKind::from_raw(1), Ok(QueueKind::Fault));
    assert_eq!(QueueKind::from_raw(2), Ok(QueueKind::Response));
}

#[test]
fn fault_entries_are_64_bytes_and_response_entries_32() {
    assert_eq!(QueueKind::Fault.entry_size(), 64);
    assert_eq!(QueueKind::Response.entry_size(), 32);
}

#[test]
fn queue_kinds_display_as_fault_and_response() {
    assert_eq!(QueueKind::Fault.to_string(), "fault");
    assert_eq!(QueueKind::Response.to_string(), "response");
}

#[test]
fn host_header_bytes_follow_the_design_table() {
    let header = geometry(QueueKind::Response, 1024).host_header();
    let b = header.as_bytes();
    assert_eq!(&b[0..4], b"IOPF", "magic");
    assert_eq!(le16(b, 4), 2, "version");
    assert_eq!(le16(b, 6), 2, "kind: response");
    assert_eq!(le32(b, 8), 32, "entry_size");
    assert_eq!(le32(b, 12), 1024, "nb_entries");
    assert_eq!(le32(b, 16), 8192, "offset");
    assert_eq!(le32(b, 20), 0, "flags");
    assert_eq!(le64(b, 24), 0, "lost");
    assert_eq!(le64(b, 32), 0, "rejected");
    assert!(b[40..64].iter().all(|&x| x == 0), "reserved");
    assert_eq!(le32(b, 64), 0, "index");
    assert_eq!(le32(b, 68), 0, "pad");
}

#[test]
fn vmm_header_bytes_follow_the_design_table() {
    let header = VmmPageHeader {
        abi: VMM_ABI.into(),
        flags: FLAG_NEED_WAKEUP.into(),
        index: 0xdead_beef.into(),
        ..Default::default()
    };
    let b = header.as_bytes();
    assert_eq!(b.len(), 68);
    assert_eq!(le32(b, 0), 2, "abi");
    assert_eq!(le32(b, 4), 2, "flags: NEED_WAKEUP");
    assert!(
        b[8..64].iter().all(|&x| x == 0),
        "reserved to the end of the line"
    );
    assert_eq!(le32(b, 64), 0xdead_beef, "index, alone in the second line");
}

// ---- geometry ----------------------------------------------------------------------------

#[test]
fn geometry_accepts_every_power_of_two_from_2_to_65536() {
    for shift in 1..=16 {
        let g = geometry(QueueKind::Fault, 1 << shift);
        assert_eq!(g.nb_entries(), 1 << shift);
        assert_eq!(g.kind(), QueueKind::Fault);
    }
}

#[test]
fn geometry_refuses_one_entry() {
    assert_eq!(
        QueueGeometry::new(QueueKind::Fault, 1),
        Err(RegionError::BadEntryCount(1))
    );
}

#[test]
fn geometry_refuses_zero_entries() {
    assert_eq!(
        QueueGeometry::new(QueueKind::Response, 0),
        Err(RegionError::BadEntryCount(0))
    );
}

#[test]
fn geometry_refuses_131072_entries() {
    assert_eq!(
        QueueGeometry::new(QueueKind::Fault, 1 << 17),
        Err(RegionError::BadEntryCount(1 << 17))
    );
}

#[test]
fn geometry_accepts_exactly_the_valid_counts_up_to_2_pow_17() {
    for n in 0..=(1 << 17) {
        assert_eq!(
            QueueGeometry::new(QueueKind::Fault, n).is_ok(),
            is_valid_count(n),
            "nb_entries {n}"
        );
    }
}

#[test]
fn region_len_of_2_fault_entries_is_8320() {
    assert_eq!(geometry(QueueKind::Fault, 2).region_len(), 8192 + 2 * 64);
}

#[test]
fn region_len_of_65536_fault_entries_is_8_kib_plus_4_mib() {
    assert_eq!(
        geometry(QueueKind::Fault, 65536).region_len(),
        8192 + 4 * 1024 * 1024
    );
}

#[test]
fn region_len_of_1024_response_entries_is_8_kib_plus_32_kib() {
    assert_eq!(
        geometry(QueueKind::Response, 1024).region_len(),
        8192 + 32 * 1024
    );
}

#[test]
fn entry_offsets_of_a_4_entry_fault_queue() {
    let g = geometry(QueueKind::Fault, 4);
    assert_eq!(g.offset(), 8192);
    assert_eq!(g.entry_size(), 64);
    let offsets: Vec<u64> = (0..6).map(|i| g.entry_offset(i)).collect();
    assert_eq!(offsets, [8192, 8256, 8320, 8384, 8192, 8256]);
}

#[test]
fn entry_offsets_of_a_16_entry_response_queue() {
    let g = geometry(QueueKind::Response, 16);
    assert_eq!(g.entry_offset(0), 8192);
    assert_eq!(g.entry_offset(15), 8192 + 15 * 32);
    assert_eq!(g.entry_offset(16), 8192);
    assert_eq!(g.entry_offset(17), 8192 + 32);
}

#[test]
fn entry_offset_of_index_u32_max_is_the_last_slot() {
    let g = geometry(QueueKind::Fault, 4);
    assert_eq!(g.entry_offset(u32::MAX), 8192 + 3 * 64);
    let g = geometry(QueueKind::Response, 65536);
    assert_eq!(g.entry_offset(u32::MAX), 8192 + 65535 * 32);
}

#[test]
fn entry_offset_wraps_from_u32_max_to_slot_0() {
    let g = geometry(QueueKind::Fault, 8);
    assert_eq!(g.entry_offset(u32::MAX.wrapping_add(1)), g.entry_offset(0));
    assert_eq!(g.entry_offset(0), 8192);
}

#[test]
fn the_last_entry_ends_at_region_len() {
    let g = geometry(QueueKind::Fault, 64);
    assert_eq!(
        g.entry_offset(63) + u64::from(g.entry_size()),
        g.region_len()
    );
}

proptest! {
    #[test]
    fn geometry_accepts_exactly_powers_of_two_in_2_to_65536(
        kind in any_kind(),
        n in entry_count(),
    ) {
        let result = QueueGeometry::new(kind, n);
        if is_valid_count(n) {
            prop_assert_eq!(result.map(|g| (g.kind(), g.nb_entries())), Ok((kind, n)));
        } else {
            prop_assert_eq!(result, Err(RegionError::BadEntryCount(n)));
        }
    }

    #[test]
    fn host_header_is_accepted_by_from_host_header(g in any_geometry()) {
        prop_assert_eq!(
            QueueGeometry::from_host_header(&g.host_header(), g.kind(), g.region_len()),
            Ok(g)
        );
    }

    #[test]
    fn host_header_round_trips_through_its_bytes(g in any_geometry()) {
        let header = g.host_header();
        let read = HostPageHeader::read_from_bytes(header.as_bytes()).unwrap();
        prop_assert_eq!(read, header);
        prop_assert_eq!(
            QueueGeometry::from_host_header(&read, g.kind(), g.region_len()),
            Ok(g)
        );
    }

    #[test]
    fn live_header_with_any_counters_and_index_is_accepted(
        g in any_geometry(),
        flags in 0u32..=3,
        index in any::<u32>(),
        lost in any::<u64>(),
        rejected in any::<u64>(),
        extra_len in 0u64..=1 << 20,
    ) {
        let mut header = g.host_header();
        // NEED_WAKEUP in the host page belongs to the response queue's host consumer.
        let flags = match g.kind() {
            QueueKind::Fault => flags & HOST_FLAG_LIVE,
            QueueKind::Response => flags,
        };
        header.flags = flags.into();
        header.index = index.into();
        header.lost = lost.into();
        header.rejected = rejected.into();
        prop_assert_eq!(
            QueueGeometry::from_host_header(&header, g.kind(), g.region_len() + extra_len),
            Ok(g)
        );
    }

    #[test]
    fn entry_offset_is_offset_plus_index_mod_entries_times_size(
        g in any_geometry(),
        index in any::<u32>(),
    ) {
        let slot = u64::from(index % g.nb_entries());
        prop_assert_eq!(
            g.entry_offset(index),
            u64::from(g.offset()) + slot * u64::from(g.entry_size())
        );
        prop_assert!(g.entry_offset(index) + u64::from(g.entry_size()) <= g.region_len());
    }

    #[test]
    fn consecutive_indices_name_consecutive_slots_across_the_wrap(
        g in any_geometry(),
        index in any::<u32>(),
    ) {
        let next = g.entry_offset(index.wrapping_add(1));
        let this = g.entry_offset(index);
        if (index.wrapping_add(1)) % g.nb_entries() == 0 {
            prop_assert_eq!(next, u64::from(g.offset()));
        } else {
            prop_assert_eq!(next, this + u64::from(g.entry_size()));
        }
    }

    #[test]
    fn checking_any_header_bytes_returns_instead_of_panicking(
        bytes in any::<[u8; 72]>(),
        kind in any_kind(),
        len in any::<u64>(),
    ) {
        let header = HostPageHeader::read_from_bytes(&bytes).unwrap();
        if let Ok(g) = QueueGeometry::from_host_header(&header, kind, len) {
            let encoded = encode_with_live_fields(g, &header);
            prop_assert_eq!(encoded.as_bytes(), &bytes[..]);
        }
    }

    #[test]
    fn near_valid_header_bytes_that_are_accepted_re_encode_to_the_same_bytes(
        (bytes, g, len) in mutated_header(),
    ) {
        let header = HostPageHeader::read_from_bytes(&bytes).unwrap();
        // A mutated entry count may still be valid and fit: then it is another geometry, which
        // must encode to these bytes all the same.
        if let Ok(found) = QueueGeometry::from_host_header(&header, g.kind(), len) {
            let encoded = encode_with_live_fields(found, &header);
            prop_assert_eq!(encoded.as_bytes(), &bytes[..]);
        }
    }
}

// ---- refusals: one per RegionError variant -------------------------------------------------

#[test]
fn region_smaller_than_its_two_header_pages_is_refused() {
    let (_, header) = fault_queue();
    assert_eq!(
        QueueGeometry::from_host_header(&header, QueueKind::Fault, 8191),
        Err(RegionError::TooSmall {
            needed: 8192,
            len: 8191
        })
    );
}

#[test]
fn region_smaller_than_its_header_pages_is_refused_before_reading_the_header() {
    assert_eq!(
        QueueGeometry::from_host_header(&HostPageHeader::default(), QueueKind::Fault, 0),
        Err(RegionError::TooSmall {
            needed: 8192,
            len: 0
        })
    );
}

#[test]
fn region_of_exactly_its_header_pages_is_refused_for_its_entries() {
    // 8192 bytes hold both header pages: the header is read, and the region is refused for
    // want of room for the entries, naming the whole length the queue needs.
    let (g, header) = fault_queue();
    assert_eq!(
        QueueGeometry::from_host_header(&header, QueueKind::Fault, 8192),
        Err(RegionError::TooSmall {
            needed: g.region_len(),
            len: 8192
        })
    );
}

#[test]
fn region_too_small_for_its_entries_is_refused() {
    let (g, header) = fault_queue();
    let len = g.region_len() - 1;
    assert_eq!(
        QueueGeometry::from_host_header(&header, QueueKind::Fault, len),
        Err(RegionError::TooSmall {
            needed: g.region_len(),
            len
        })
    );
}

#[test]
fn header_with_bad_magic_is_refused() {
    let (_, mut header) = fault_queue();
    header.magic = u32::from_le_bytes(*b"IOPG").into();
    assert_eq!(
        check_fault_header(&header),
        Err(RegionError::BadMagic(u32::from_le_bytes(*b"IOPG")))
    );
}

#[test]
fn header_with_byte_swapped_magic_is_refused() {
    let (_, mut header) = fault_queue();
    header.magic = REGION_MAGIC.swap_bytes().into();
    assert_eq!(
        check_fault_header(&header),
        Err(RegionError::BadMagic(REGION_MAGIC.swap_bytes()))
    );
}

#[test]
fn header_of_abi_v1_is_refused() {
    let (_, mut header) = fault_queue();
    header.version = 1.into();
    assert_eq!(
        check_fault_header(&header),
        Err(RegionError::UnsupportedVersion(1))
    );
    assert_eq!(
        RegionError::UnsupportedVersion(1).to_string(),
        "unsupported region version 1 (this build speaks ABI v2 only)"
    );
}

#[test]
fn header_version_0_is_refused() {
    let (_, mut header) = fault_queue();
    header.version = 0.into();
    assert_eq!(
        check_fault_header(&header),
        Err(RegionError::UnsupportedVersion(0))
    );
}

#[test]
fn header_kind_0_is_refused() {
    let (_, mut header) = fault_queue();
    header.kind = 0.into();
    assert_eq!(
        check_fault_header(&header),
        Err(RegionError::UnknownKind(0))
    );
}

#[test]
fn header_kind_3_is_refused() {
    let (_, mut header) = fault_queue();
    header.kind = 3.into();
    assert_eq!(
        check_fault_header(&header),
        Err(RegionError::UnknownKind(3))
    );
}

#[test]
fn fault_queue_header_is_refused_where_a_response_queue_is_expected() {
    let (g, header) = fault_queue();
    assert_eq!(
        QueueGeometry::from_host_header(&header, QueueKind::Response, g.region_len()),
        Err(RegionError::WrongKind {
            expected: QueueKind::Response,
            found: QueueKind::Fault
        })
    );
}

#[test]
fn response_queue_header_is_refused_where_a_fault_queue_is_expected() {
    let g = geometry(QueueKind::Response, 16);
    assert_eq!(
        QueueGeometry::from_host_header(&g.host_header(), QueueKind::Fault, 1 << 20),
        Err(RegionError::WrongKind {
            expected: QueueKind::Fault,
            found: QueueKind::Response
        })
    );
}

#[test]
fn fault_queue_header_with_response_entry_size_is_refused() {
    let (_, mut header) = fault_queue();
    header.entry_size = 32.into();
    assert_eq!(
        check_fault_header(&header),
        Err(RegionError::BadEntrySize {
            kind: QueueKind::Fault,
            expected: 64,
            found: 32
        })
    );
}

#[test]
fn response_queue_header_with_fault_entry_size_is_refused() {
    let g = geometry(QueueKind::Response, 16);
    let mut header = g.host_header();
    header.entry_size = 64.into();
    assert_eq!(
        QueueGeometry::from_host_header(&header, QueueKind::Response, g.region_len()),
        Err(RegionError::BadEntrySize {
            kind: QueueKind::Response,
            expected: 32,
            found: 64
        })
    );
}

#[test]
fn header_entry_count_not_a_power_of_two_is_refused() {
    let (_, mut header) = fault_queue();
    header.nb_entries = 255.into();
    assert_eq!(
        check_fault_header(&header),
        Err(RegionError::BadEntryCount(255))
    );
}

#[test]
fn header_entry_count_above_65536_is_refused() {
    let (_, mut header) = fault_queue();
    header.nb_entries = (1 << 17).into();
    assert_eq!(
        QueueGeometry::from_host_header(&header, QueueKind::Fault, u64::MAX),
        Err(RegionError::BadEntryCount(1 << 17))
    );
}

#[test]
fn header_entry_offset_other_than_8192_is_refused() {
    let (_, mut header) = fault_queue();
    header.offset = 4096.into();
    assert_eq!(
        check_fault_header(&header),
        Err(RegionError::BadOffset(4096))
    );
}

#[test]
fn header_with_undefined_flag_bits_is_refused() {
    let (_, mut header) = fault_queue();
    header.flags = (HOST_FLAG_LIVE | 1 << 2 | 1 << 31).into();
    assert_eq!(
        check_fault_header(&header),
        Err(RegionError::UnknownFlags(1 << 2 | 1 << 31))
    );
}

#[test]
fn header_with_reserved_word_set_is_refused() {
    let (_, mut header) = fault_queue();
    header.reserved[5] = 1.into();
    assert_eq!(
        check_fault_header(&header),
        Err(RegionError::ReservedNonZero(1))
    );
}

#[test]
fn fault_queue_header_with_need_wakeup_is_refused() {
    let (_, mut header) = fault_queue();
    header.flags = (HOST_FLAG_LIVE | FLAG_NEED_WAKEUP).into();
    assert_eq!(
        check_fault_header(&header),
        Err(RegionError::UnknownFlags(FLAG_NEED_WAKEUP))
    );
}
