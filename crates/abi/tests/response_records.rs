//! The 32-byte response record (`docs/DESIGN.md` §3.4): layout, round trip,
//! canonical encoding, and one test per input the decoder must refuse.

use iopf_abi::{
    Cookie, DecodeError, PageResponse, Pasid, PrgIndex, RESPONSE_PASID_VALID, RESPONSE_VERSION,
    ResponseCode, ResponseRecord,
};
use proptest::prelude::*;
use zerocopy::{FromBytes, IntoBytes};

fn le32(bytes: &[u8], off: usize) -> u32 {
    u32::from_le_bytes(bytes[off..off + 4].try_into().unwrap())
}

fn le64(bytes: &[u8], off: usize) -> u64 {
    u64::from_le_bytes(bytes[off..off + 8].try_into().unwrap())
}

fn response() -> PageResponse {
    PageResponse {
        cookie: Cookie::new(0xcafe_f00d).unwrap(),
        pasid: Some(Pasid::new(0x1_2345).unwrap()),
        grpid: PrgIndex::new(0x155).unwrap(),
        code: ResponseCode::Invalid,
    }
}

fn record() -> ResponseRecord {
    ResponseRecord::from(&response())
}

fn record_without_pasid() -> ResponseRecord {
    ResponseRecord::from(&PageResponse {
        pasid: None,
        ..response()
    })
}

fn refused(record: ResponseRecord) -> DecodeError {
    record
        .decode()
        .expect_err("decoder accepted a response ABI v2 refuses")
}

prop_compose! {
    fn any_response()(
        cookie in 1..=u32::MAX,
        pasid in proptest::option::of(0..=Pasid::MAX),
        grpid in 0..=u32::from(PrgIndex::MAX),
        code in 0u32..=2,
    ) -> PageResponse {
        PageResponse {
            cookie: Cookie::new(cookie).unwrap(),
            pasid: pasid.map(|p| Pasid::new(p).unwrap()),
            grpid: PrgIndex::new(grpid).unwrap(),
            code: ResponseCode::from_raw(code).unwrap(),
        }
    }
}

/// The bytes of a valid response with up to three bytes overwritten.
fn mutated_response_bytes() -> impl Strategy<Value = [u8; 32]> {
    (
        any_response(),
        proptest::collection::vec((0usize..32, any::<u8>()), 0..=3),
    )
        .prop_map(|(response, edits)| {
            let mut bytes = [0u8; 32];
            bytes.copy_from_slice(ResponseRecord::from(&response).as_bytes());
            for (at, value) in edits {
                bytes[at] = value;
            }
            bytes
        })
}

// ---- layout and round trip ---------------------------------------------------------------

#[test]
fn response_record_is_32_bytes() {
    assert_eq!(core::mem::size_of::<ResponseRecord>(), 32);
}

#[test]
fn response_constants_are_those_of_iommu_page_response_v1() {
    assert_eq!(RESPONSE_VERSION, 1);
    assert_eq!(RESPONSE_PASID_VALID, 1);
    assert_eq!(ResponseCode::Success as u32, 0);
    assert_eq!(ResponseCode::Invalid as u32, 1);
    assert_eq!(ResponseCode::Failure as u32, 2);
}

#[test]
fn response_bytes_follow_the_design_table() {
    let r = record();
    let b = r.as_bytes();
    assert_eq!(le32(b, 0), 1, "version");
    assert_eq!(le32(b, 4), 1, "flags: PASID_VALID");
    assert_eq!(le32(b, 8), 0x1_2345, "pasid");
    assert_eq!(le32(b, 12), 0x155, "grpid");
    assert_eq!(le32(b, 16), 1, "code: INVALID");
    assert_eq!(le32(b, 20), 0xcafe_f00d, "cookie");
    assert_eq!(le64(b, 24), 0, "reserved");
}

#[test]
fn response_without_pasid_has_zero_flags_and_pasid() {
    let r = record_without_pasid();
    assert_eq!((r.flags.get(), r.pasid.get()), (0, 0));
}

#[test]
fn failure_code_is_well_formed_on_the_wire() {
    // Whether FAILURE reaches a device is the fault core's policy, not the decoder's.
    let failure = PageResponse {
        code: ResponseCode::Failure,
        ..response()
    };
    assert_eq!(ResponseRecord::from(&failure).decode(), Ok(failure));
}

proptest! {
    #[test]
    fn any_valid_response_round_trips(response in any_response()) {
        prop_assert_eq!(ResponseRecord::from(&response).decode(), Ok(response));
    }

    #[test]
    fn response_bytes_are_its_fields_at_their_offsets(r in any_response()) {
        let record = ResponseRecord::from(&r);
        let b = record.as_bytes();
        prop_assert_eq!(le32(b, 0), RESPONSE_VERSION);
        prop_assert_eq!(le32(b, 4), u32::from(r.pasid.is_some()));
        prop_assert_eq!(le32(b, 8), r.pasid.map_or(0, Pasid::get));
        prop_assert_eq!(le32(b, 12), u32::from(r.grpid.get()));
        prop_assert_eq!(le32(b, 16), r.code as u32);
        prop_assert_eq!(le32(b, 20), r.cookie.get());
        prop_assert_eq!(le64(b, 24), 0);
    }

    #[test]
    fn any_32_bytes_that_decode_re_encode_to_the_same_bytes(bytes in any::<[u8; 32]>()) {
        let record = ResponseRecord::read_from_bytes(&bytes).unwrap();
        if let Ok(response) = record.decode() {
            let again = ResponseRecord::from(&response);
            // Every byte but the ring's mark (bytes 24..32) is the response's.
            prop_assert_eq!(&again.as_bytes()[..24], &bytes[..24]);
        }
    }

    #[test]
    fn near_valid_bytes_that_decode_re_encode_to_the_same_bytes(
        bytes in mutated_response_bytes(),
    ) {
        let record = ResponseRecord::read_from_bytes(&bytes).unwrap();
        if let Ok(response) = record.decode() {
            let again = ResponseRecord::from(&response);
            // Every byte but the ring's mark (bytes 24..32) is the response's.
            prop_assert_eq!(&again.as_bytes()[..24], &bytes[..24]);
        }
    }

    #[test]
    fn decoding_any_32_bytes_returns_instead_of_panicking(bytes in any::<[u8; 32]>()) {
        let record = ResponseRecord::read_from_bytes(&bytes).unwrap();
        let _ = record.decode();
    }

    #[test]
    fn decoding_any_version_1_record_returns_instead_of_panicking(mut words in any::<[u32; 8]>()) {
        words[0] = RESPONSE_VERSION;
        let record = ResponseRecord::read_from_bytes(words.as_bytes()).unwrap();
        let _ = record.decode();
    }

    #[test]
    fn a_slice_that_is_not_32_bytes_is_no_record(len in 0usize..100) {
        prop_assume!(len != 32);
        prop_assert!(ResponseRecord::read_from_bytes(&vec![0u8; len]).is_err());
    }
}

// ---- refusals ----------------------------------------------------------------------------

#[test]
fn response_version_0_is_refused() {
    let mut r = record();
    r.version = 0.into();
    assert_eq!(refused(r), DecodeError::UnsupportedResponseVersion(0));
}

#[test]
fn response_version_2_is_refused() {
    let mut r = record();
    r.version = 2.into();
    assert_eq!(refused(r), DecodeError::UnsupportedResponseVersion(2));
}

#[test]
fn the_mark_is_the_rings_and_not_part_of_the_response() {
    let r = record();
    let mut marked = r;
    marked.mark = iopf_abi::mark(u32::MAX).into();
    assert_eq!(marked.decode(), r.decode());
    assert_eq!(core::mem::offset_of!(ResponseRecord, mark), 24);
}

#[test]
fn response_with_zero_cookie_is_refused() {
    let mut r = record();
    r.cookie = 0.into();
    assert_eq!(refused(r), DecodeError::ZeroCookie);
}

#[test]
fn response_with_undefined_flag_bit_is_refused() {
    let mut r = record();
    r.flags = (RESPONSE_PASID_VALID | 1 << 1).into();
    assert_eq!(
        refused(r),
        DecodeError::UnknownBits {
            field: "flags",
            bits: 1 << 1
        }
    );
}

#[test]
fn response_with_pasid_wider_than_20_bits_is_refused() {
    let mut r = record();
    r.pasid = (1 << 20).into();
    assert_eq!(refused(r), DecodeError::PasidOutOfRange(1 << 20));
}

#[test]
fn response_with_pasid_but_no_pasid_valid_is_refused() {
    let mut r = record_without_pasid();
    r.pasid = 3.into();
    assert_eq!(
        refused(r),
        DecodeError::NonZero {
            field: "pasid",
            value: 3
        }
    );
}

#[test]
fn response_with_prg_index_512_is_refused() {
    let mut r = record();
    r.grpid = 512.into();
    assert_eq!(refused(r), DecodeError::PrgIndexOutOfRange(512));
}

#[test]
fn response_code_3_is_refused() {
    let mut r = record();
    r.code = 3.into();
    assert_eq!(refused(r), DecodeError::UnknownResponseCode(3));
}
