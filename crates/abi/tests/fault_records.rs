//! The 64-byte fault record (`docs/DESIGN.md` §3.3): layout, round trip, canonical
//! encoding, and one test per input the decoder must refuse.

use iopf_abi::{
    Cookie, DecodeError, FAULT_TYPE_PAGE_REQUEST, FAULT_TYPE_UNRECOVERABLE, Fault, FaultReason,
    FaultRecord, PageAddr, PageRequest, Pasid, Perm, PrgIndex, UnrecoverableFault,
    page_request_flags, unrecoverable_flags,
};
use proptest::prelude::*;
use zerocopy::{FromBytes, IntoBytes};

// ---- helpers -----------------------------------------------------------------------------

fn le32(bytes: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap())
}

fn le64(bytes: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
}

/// A page request with every optional field present.
fn page_request() -> PageRequest {
    PageRequest {
        cookie: Cookie::new(0x1234_5678).unwrap(),
        pasid: Some(Pasid::new(0x4_2a5c).unwrap()),
        grpid: PrgIndex::new(0x1a3).unwrap(),
        perm: Perm::READ | Perm::WRITE,
        addr: PageAddr::containing(0x7f12_3456_7000),
        last: true,
        private_data: Some([0x1111_2222_3333_4444, 0x5555_6666_7777_8888]),
    }
}

/// The record of [`page_request`].
fn page_request_record() -> FaultRecord {
    FaultRecord::from(&page_request())
}

/// The same page request without PASID and without private data.
fn bare_page_request_record() -> FaultRecord {
    FaultRecord::from(&PageRequest {
        pasid: None,
        private_data: None,
        ..page_request()
    })
}

/// An unrecoverable fault with every optional field present.
fn unrecoverable() -> UnrecoverableFault {
    UnrecoverableFault {
        reason: FaultReason::Permission,
        pasid: Some(Pasid::new(0xabcde).unwrap()),
        perm: Perm::EXEC | Perm::PRIV,
        addr: Some(0xdead_beef_0123),
        fetch_addr: Some(0x1_0000_0008),
    }
}

/// The record of [`unrecoverable`].
fn unrecoverable_record() -> FaultRecord {
    FaultRecord::from(&unrecoverable())
}

/// An unrecoverable fault record with no optional field present.
fn bare_unrecoverable_record() -> FaultRecord {
    FaultRecord::from(&UnrecoverableFault {
        pasid: None,
        addr: None,
        fetch_addr: None,
        ..unrecoverable()
    })
}

fn refused(record: FaultRecord) -> DecodeError {
    record
        .decode()
        .expect_err("decoder accepted a record ABI v2 refuses")
}

fn non_zero(field: &'static str, value: u64) -> DecodeError {
    DecodeError::NonZero { field, value }
}

fn unknown_bits(field: &'static str, bits: u32) -> DecodeError {
    DecodeError::UnknownBits { field, bits }
}

// ---- strategies --------------------------------------------------------------------------

fn cookie() -> impl Strategy<Value = Cookie> {
    (1..=u32::MAX).prop_map(|c| Cookie::new(c).unwrap())
}

fn pasid() -> impl Strategy<Value = Option<Pasid>> {
    proptest::option::of((0..=Pasid::MAX).prop_map(|p| Pasid::new(p).unwrap()))
}

fn grpid() -> impl Strategy<Value = PrgIndex> {
    (0..=u32::from(PrgIndex::MAX)).prop_map(|g| PrgIndex::new(g).unwrap())
}

fn perm() -> impl Strategy<Value = Perm> {
    (0..=Perm::all().bits()).prop_map(|p| Perm::from_bits(p).unwrap())
}

fn reason() -> impl Strategy<Value = FaultReason> {
    (0u32..=8).prop_map(|r| FaultReason::from_raw(r).unwrap())
}

prop_compose! {
    fn any_page_request()(
        cookie in cookie(),
        pasid in pasid(),
        grpid in grpid(),
        perm in perm(),
        page in any::<u64>(),
        last in any::<bool>(),
        private_data in proptest::option::of(any::<[u64; 2]>()),
    ) -> PageRequest {
        PageRequest { cookie, pasid, grpid, perm, addr: PageAddr::containing(page), last, private_data }
    }
}

prop_compose! {
    fn any_unrecoverable()(
        reason in reason(),
        pasid in pasid(),
        perm in perm(),
        addr in proptest::option::of(any::<u64>()),
        fetch_addr in proptest::option::of(any::<u64>()),
    ) -> UnrecoverableFault {
        UnrecoverableFault { reason, pasid, perm, addr, fetch_addr }
    }
}

fn any_fault() -> impl Strategy<Value = Fault> {
    prop_oneof![
        any_page_request().prop_map(Fault::PageRequest),
        any_unrecoverable().prop_map(Fault::Unrecoverable),
    ]
}

/// The bytes of a valid record with up to three bytes overwritten: some still decode (and
/// must then re-encode to themselves), some do not (and must be refused without panicking).
fn mutated_record_bytes() -> impl Strategy<Value = [u8; 64]> {
    (
        any_fault(),
        proptest::collection::vec((0usize..64, any::<u8>()), 0..=3),
    )
        .prop_map(|(fault, edits)| {
            let mut bytes = [0u8; 64];
            bytes.copy_from_slice(FaultRecord::from(&fault).as_bytes());
            for (at, value) in edits {
                bytes[at] = value;
            }
            bytes
        })
}

// ---- layout and round trip ---------------------------------------------------------------

#[test]
fn fault_record_is_64_bytes() {
    assert_eq!(core::mem::size_of::<FaultRecord>(), 64);
    assert_eq!(page_request_record().as_bytes().len(), 64);
}

#[test]
fn fault_types_are_those_of_struct_iommu_fault() {
    assert_eq!(FAULT_TYPE_UNRECOVERABLE, 1);
    assert_eq!(FAULT_TYPE_PAGE_REQUEST, 2);
}

#[test]
fn flag_bits_are_those_of_the_kernel_uapi() {
    // `IOMMU_FAULT_PAGE_REQUEST_*`, `IOMMU_FAULT_UNRECOV_*` and `IOMMU_FAULT_PERM_*` of
    // <linux/iommu.h>: a record is the kernel's, bit for bit.
    assert_eq!(page_request_flags::PASID_VALID, 1 << 0);
    assert_eq!(page_request_flags::LAST_PAGE, 1 << 1);
    assert_eq!(page_request_flags::PRIV_DATA, 1 << 2);
    assert_eq!(page_request_flags::ALL, 0b111);
    assert_eq!(unrecoverable_flags::PASID_VALID, 1 << 0);
    assert_eq!(unrecoverable_flags::ADDR_VALID, 1 << 1);
    assert_eq!(unrecoverable_flags::FETCH_ADDR_VALID, 1 << 2);
    assert_eq!(unrecoverable_flags::ALL, 0b111);
    assert_eq!(Perm::READ.bits(), 1 << 0);
    assert_eq!(Perm::WRITE.bits(), 1 << 1);
    assert_eq!(Perm::EXEC.bits(), 1 << 2);
    assert_eq!(Perm::PRIV.bits(), 1 << 3);
    assert_eq!(iopf_abi::RESPONSE_PASID_VALID, 1 << 0);
}

#[test]
fn a_fault_encodes_as_the_record_of_its_variant() {
    let request = page_request();
    let fault = unrecoverable();
    assert_eq!(
        FaultRecord::from(&Fault::PageRequest(request)),
        page_request_record()
    );
    assert_eq!(
        FaultRecord::from(&Fault::Unrecoverable(fault)),
        unrecoverable_record()
    );
    assert_eq!(
        FaultRecord::from(&Fault::PageRequest(request)).decode(),
        Ok(Fault::PageRequest(request))
    );
}

#[test]
fn page_request_bytes_follow_the_design_table() {
    let record = page_request_record();
    let b = record.as_bytes();
    assert_eq!(le32(b, 0), 2, "type");
    assert_eq!(le32(b, 4), 0x1234_5678, "cookie");
    assert_eq!(
        le32(b, 8),
        0b111,
        "flags: PASID_VALID | LAST_PAGE | PRIV_DATA"
    );
    assert_eq!(le32(b, 12), 0x4_2a5c, "pasid");
    assert_eq!(le32(b, 16), 0x1a3, "grpid");
    assert_eq!(le32(b, 20), 0b11, "perm: READ | WRITE");
    assert_eq!(le64(b, 24), 0x7f12_3456_7000, "addr");
    assert_eq!(le64(b, 32), 0x1111_2222_3333_4444, "private_data[0]");
    assert_eq!(le64(b, 40), 0x5555_6666_7777_8888, "private_data[1]");
    assert_eq!(&b[48..64], &[0; 16], "reserved");
}

#[test]
fn unrecoverable_fault_bytes_follow_the_design_table() {
    let record = unrecoverable_record();
    let b = record.as_bytes();
    assert_eq!(le32(b, 0), 1, "type");
    assert_eq!(le32(b, 4), 0, "cookie");
    assert_eq!(le32(b, 8), 6, "reason: permission");
    assert_eq!(
        le32(b, 12),
        0b111,
        "flags: PASID_VALID | ADDR_VALID | FETCH_ADDR_VALID"
    );
    assert_eq!(le32(b, 16), 0xabcde, "pasid");
    assert_eq!(le32(b, 20), 0b1100, "perm: EXEC | PRIV");
    assert_eq!(le64(b, 24), 0xdead_beef_0123, "addr");
    assert_eq!(le64(b, 32), 0x1_0000_0008, "fetch_addr");
    assert_eq!(&b[40..64], &[0; 24], "trailing zeros");
}

#[test]
fn absent_optional_fields_encode_as_zero() {
    let b = bare_page_request_record();
    assert_eq!(b.word2.get(), page_request_flags::LAST_PAGE);
    assert_eq!((b.word3.get(), b.data0.get(), b.data1.get()), (0, 0, 0));
    let u = bare_unrecoverable_record();
    assert_eq!(u.word3.get(), 0);
    assert_eq!((u.word4.get(), u.addr.get(), u.data0.get()), (0, 0, 0));
}

#[test]
fn page_request_with_largest_pasid_and_prg_index_is_accepted() {
    let request = PageRequest {
        pasid: Some(Pasid::new(Pasid::MAX).unwrap()),
        grpid: PrgIndex::new(511).unwrap(),
        ..page_request()
    };
    assert_eq!(
        FaultRecord::from(&request).decode(),
        Ok(Fault::PageRequest(request))
    );
}

#[test]
fn unrecoverable_fault_address_need_not_be_page_aligned() {
    let fault = UnrecoverableFault {
        addr: Some(0x1001),
        ..unrecoverable()
    };
    assert_eq!(
        FaultRecord::from(&fault).decode(),
        Ok(Fault::Unrecoverable(fault))
    );
}

#[test]
fn present_fields_may_hold_zero() {
    let request = PageRequest {
        pasid: Some(Pasid::new(0).unwrap()),
        private_data: Some([0, 0]),
        addr: PageAddr::containing(0),
        ..page_request()
    };
    assert_eq!(
        FaultRecord::from(&request).decode(),
        Ok(Fault::PageRequest(request))
    );
    let fault = UnrecoverableFault {
        pasid: Some(Pasid::new(0).unwrap()),
        addr: Some(0),
        fetch_addr: Some(0),
        ..unrecoverable()
    };
    assert_eq!(
        FaultRecord::from(&fault).decode(),
        Ok(Fault::Unrecoverable(fault))
    );
}

proptest! {
    #[test]
    fn any_valid_page_request_round_trips(request in any_page_request()) {
        let record = FaultRecord::from(&request);
        prop_assert_eq!(record.decode(), Ok(Fault::PageRequest(request)));
    }

    #[test]
    fn any_valid_unrecoverable_fault_round_trips(fault in any_unrecoverable()) {
        let record = FaultRecord::from(&fault);
        prop_assert_eq!(record.decode(), Ok(Fault::Unrecoverable(fault)));
    }

    #[test]
    fn page_request_bytes_are_its_fields_at_their_offsets(r in any_page_request()) {
        let record = FaultRecord::from(&r);
        let b = record.as_bytes();
        let flags = u32::from(r.pasid.is_some())
            | u32::from(r.last) << 1
            | u32::from(r.private_data.is_some()) << 2;
        let [d0, d1] = r.private_data.unwrap_or_default();
        prop_assert_eq!(le32(b, 0), FAULT_TYPE_PAGE_REQUEST);
        prop_assert_eq!(le32(b, 4), r.cookie.get());
        prop_assert_eq!(le32(b, 8), flags);
        prop_assert_eq!(le32(b, 12), r.pasid.map_or(0, Pasid::get));
        prop_assert_eq!(le32(b, 16), u32::from(r.grpid.get()));
        prop_assert_eq!(le32(b, 20), r.perm.bits());
        prop_assert_eq!(le64(b, 24), r.addr.get());
        prop_assert_eq!(le64(b, 32), d0);
        prop_assert_eq!(le64(b, 40), d1);
        prop_assert_eq!(&b[48..64], &[0u8; 16][..]);
    }

    #[test]
    fn unrecoverable_bytes_are_its_fields_at_their_offsets(u in any_unrecoverable()) {
        let record = FaultRecord::from(&u);
        let b = record.as_bytes();
        let flags = u32::from(u.pasid.is_some())
            | u32::from(u.addr.is_some()) << 1
            | u32::from(u.fetch_addr.is_some()) << 2;
        prop_assert_eq!(le32(b, 0), FAULT_TYPE_UNRECOVERABLE);
        prop_assert_eq!(le32(b, 4), 0);
        prop_assert_eq!(le32(b, 8), u.reason as u32);
        prop_assert_eq!(le32(b, 12), flags);
        prop_assert_eq!(le32(b, 16), u.pasid.map_or(0, Pasid::get));
        prop_assert_eq!(le32(b, 20), u.perm.bits());
        prop_assert_eq!(le64(b, 24), u.addr.unwrap_or(0));
        prop_assert_eq!(le64(b, 32), u.fetch_addr.unwrap_or(0));
        prop_assert_eq!(&b[40..64], &[0u8; 24][..]);
    }

    #[test]
    fn any_64_bytes_that_decode_re_encode_to_the_same_bytes(bytes in any::<[u8; 64]>()) {
        let record = FaultRecord::read_from_bytes(&bytes).unwrap();
        if let Ok(fault) = record.decode() {
            // Every byte but the ring's mark (bytes 56..64) is the fault's.
            let again = FaultRecord::from(&fault);
            prop_assert_eq!(&again.as_bytes()[..56], &bytes[..56]);
        }
    }

    #[test]
    fn near_valid_bytes_that_decode_re_encode_to_the_same_bytes(bytes in mutated_record_bytes()) {
        let record = FaultRecord::read_from_bytes(&bytes).unwrap();
        if let Ok(fault) = record.decode() {
            // Every byte but the ring's mark (bytes 56..64) is the fault's.
            let again = FaultRecord::from(&fault);
            prop_assert_eq!(&again.as_bytes()[..56], &bytes[..56]);
        }
    }

    #[test]
    fn decoding_any_64_bytes_returns_instead_of_panicking(bytes in any::<[u8; 64]>()) {
        let record = FaultRecord::read_from_bytes(&bytes).unwrap();
        let _ = record.decode();
    }

    #[test]
    fn decoding_any_record_with_a_known_type_returns_instead_of_panicking(
        mut words in any::<[u32; 16]>(),
        page_request in any::<bool>(),
    ) {
        words[0] = if page_request { FAULT_TYPE_PAGE_REQUEST } else { FAULT_TYPE_UNRECOVERABLE };
        let record = FaultRecord::read_from_bytes(words.as_bytes()).unwrap();
        let _ = record.decode();
    }

    #[test]
    fn a_slice_that_is_not_64_bytes_is_no_record(len in 0usize..200) {
        prop_assume!(len != 64);
        prop_assert!(FaultRecord::read_from_bytes(&vec![0u8; len]).is_err());
    }
}

// ---- refusals: type ----------------------------------------------------------------------

#[test]
fn fault_type_0_is_refused() {
    let mut r = page_request_record();
    r.fault_type = 0.into();
    assert_eq!(refused(r), DecodeError::UnknownFaultType(0));
}

#[test]
fn fault_type_3_is_refused() {
    let mut r = page_request_record();
    r.fault_type = 3.into();
    assert_eq!(refused(r), DecodeError::UnknownFaultType(3));
}

#[test]
fn fault_type_u32_max_is_refused() {
    let mut r = unrecoverable_record();
    r.fault_type = u32::MAX.into();
    assert_eq!(refused(r), DecodeError::UnknownFaultType(u32::MAX));
}

// ---- refusals: reserved words --------------------------------------------------------------

#[test]
fn page_request_with_reserved_word_set_is_refused() {
    let mut r = page_request_record();
    r.reserved = (1 << 63).into();
    assert_eq!(refused(r), non_zero("reserved", 1 << 63));
}

#[test]
fn unrecoverable_fault_with_reserved_word_set_is_refused() {
    let mut r = unrecoverable_record();
    r.reserved = 2.into();
    assert_eq!(refused(r), non_zero("reserved", 2));
}

#[test]
fn the_mark_is_the_rings_and_not_part_of_the_fault() {
    let r = page_request_record();
    let mut marked = r;
    marked.mark = iopf_abi::mark(7).into();
    assert_eq!(marked.decode(), r.decode());
    assert_eq!(core::mem::offset_of!(FaultRecord, mark), 56);
}

#[test]
fn unrecoverable_fault_with_word_at_offset_40_set_is_refused() {
    let mut r = unrecoverable_record();
    r.data1 = 0x40.into();
    assert_eq!(refused(r), non_zero("event.reserved[0]", 0x40));
}

// ---- refusals: cookie --------------------------------------------------------------------

#[test]
fn unrecoverable_fault_with_cookie_is_refused() {
    let mut r = unrecoverable_record();
    r.cookie = 7.into();
    assert_eq!(refused(r), non_zero("cookie", 7));
}

#[test]
fn page_request_with_zero_cookie_is_refused() {
    let mut r = page_request_record();
    r.cookie = 0.into();
    assert_eq!(refused(r), DecodeError::ZeroCookie);
}

// ---- refusals: undefined bits --------------------------------------------------------------

#[test]
fn page_request_with_undefined_flag_bit_is_refused() {
    let mut r = page_request_record();
    r.word2 = (page_request_flags::ALL | 1 << 3).into();
    assert_eq!(refused(r), unknown_bits("flags", 1 << 3));
}

#[test]
fn page_request_with_top_flag_bit_is_refused() {
    let mut r = bare_page_request_record();
    r.word2 = (page_request_flags::LAST_PAGE | 1 << 31).into();
    assert_eq!(refused(r), unknown_bits("flags", 1 << 31));
}

#[test]
fn unrecoverable_fault_with_undefined_flag_bit_is_refused() {
    let mut r = unrecoverable_record();
    r.word3 = (unrecoverable_flags::ALL | 1 << 3).into();
    assert_eq!(refused(r), unknown_bits("flags", 1 << 3));
}

#[test]
fn page_request_with_undefined_perm_bit_is_refused() {
    let mut r = page_request_record();
    r.perm = (Perm::READ.bits() | 1 << 4).into();
    assert_eq!(refused(r), unknown_bits("perm", 1 << 4));
}

#[test]
fn unrecoverable_fault_with_undefined_perm_bit_is_refused() {
    let mut r = unrecoverable_record();
    r.perm = 0xffff_fff0_u32.into();
    assert_eq!(refused(r), unknown_bits("perm", 0xffff_fff0));
}

// ---- refusals: PASID ---------------------------------------------------------------------

#[test]
fn page_request_with_pasid_wider_than_20_bits_is_refused() {
    let mut r = page_request_record();
    r.word3 = (1 << 20).into();
    assert_eq!(refused(r), DecodeError::PasidOutOfRange(1 << 20));
}

#[test]
fn unrecoverable_fault_with_pasid_wider_than_20_bits_is_refused() {
    let mut r = unrecoverable_record();
    r.word4 = u32::MAX.into();
    assert_eq!(refused(r), DecodeError::PasidOutOfRange(u32::MAX));
}

#[test]
fn page_request_with_pasid_but_no_pasid_valid_is_refused() {
    let mut r = bare_page_request_record();
    r.word3 = 5.into();
    assert_eq!(refused(r), non_zero("pasid", 5));
}

#[test]
fn unrecoverable_fault_with_pasid_but_no_pasid_valid_is_refused() {
    let mut r = bare_unrecoverable_record();
    r.word4 = 5.into();
    assert_eq!(refused(r), non_zero("pasid", 5));
}

// ---- refusals: fields the flags mark absent ------------------------------------------------

#[test]
fn page_request_with_private_data_0_but_no_priv_data_is_refused() {
    let mut r = bare_page_request_record();
    r.data0 = 9.into();
    assert_eq!(refused(r), non_zero("private_data[0]", 9));
}

#[test]
fn page_request_with_private_data_1_but_no_priv_data_is_refused() {
    let mut r = bare_page_request_record();
    r.data1 = 9.into();
    assert_eq!(refused(r), non_zero("private_data[1]", 9));
}

#[test]
fn unrecoverable_fault_with_addr_but_no_addr_valid_is_refused() {
    let mut r = bare_unrecoverable_record();
    r.addr = 0x1000.into();
    assert_eq!(refused(r), non_zero("addr", 0x1000));
}

#[test]
fn unrecoverable_fault_with_fetch_addr_but_no_fetch_addr_valid_is_refused() {
    let mut r = bare_unrecoverable_record();
    r.data0 = 0x2000.into();
    assert_eq!(refused(r), non_zero("fetch_addr", 0x2000));
}

// ---- refusals: values out of range ---------------------------------------------------------

#[test]
fn page_request_with_unaligned_page_address_is_refused() {
    let mut r = page_request_record();
    r.addr = 0x7f12_3456_7800.into();
    assert_eq!(
        refused(r),
        DecodeError::UnalignedPageAddress(0x7f12_3456_7800)
    );
}

#[test]
fn page_request_with_address_off_by_one_byte_is_refused() {
    let mut r = page_request_record();
    r.addr = 0x1001.into();
    assert_eq!(refused(r), DecodeError::UnalignedPageAddress(0x1001));
}

#[test]
fn page_request_with_prg_index_512_is_refused() {
    let mut r = page_request_record();
    r.word4 = 512.into();
    assert_eq!(refused(r), DecodeError::PrgIndexOutOfRange(512));
}

#[test]
fn unrecoverable_fault_with_reason_9_is_refused() {
    let mut r = unrecoverable_record();
    r.word2 = 9.into();
    assert_eq!(refused(r), DecodeError::UnknownReason(9));
}

#[test]
fn unrecoverable_fault_with_reason_u32_max_is_refused() {
    let mut r = unrecoverable_record();
    r.word2 = u32::MAX.into();
    assert_eq!(refused(r), DecodeError::UnknownReason(u32::MAX));
}
