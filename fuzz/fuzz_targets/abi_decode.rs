//! The ABI decoders on arbitrary bytes: never a panic, and whatever decodes re-encodes to the
//! same bytes (one encoding per valid record). The mark is the ring's, not the record's: a
//! decoder ignores it and an encoder leaves it 0, so the comparison takes the record's own.
#![no_main]

use iopf_abi::{FaultRecord, HostPageHeader, QueueGeometry, QueueKind, ResponseRecord};
use libfuzzer_sys::fuzz_target;
use zerocopy::{FromBytes, IntoBytes};

fuzz_target!(|data: &[u8]| {
    if let Ok((record, _)) = FaultRecord::read_from_prefix(data)
        && let Ok(fault) = record.decode()
    {
        let mut encoded = FaultRecord::from(&fault);
        encoded.mark = record.mark;
        assert_eq!(encoded.as_bytes(), record.as_bytes());
    }
    if let Ok((record, _)) = ResponseRecord::read_from_prefix(data)
        && let Ok(response) = record.decode()
    {
        let mut encoded = ResponseRecord::from(&response);
        encoded.mark = record.mark;
        assert_eq!(encoded.as_bytes(), record.as_bytes());
    }
    if let Ok((header, rest)) = HostPageHeader::read_from_prefix(data) {
        let len = u64::from_le_bytes(
            rest.get(..8)
                .and_then(|b| b.try_into().ok())
                .unwrap_or([0; 8]),
        );
        for kind in [QueueKind::Fault, QueueKind::Response] {
            if let Ok(geometry) = QueueGeometry::from_host_header(&header, kind, len) {
                assert!(geometry.region_len() <= len);
                assert_eq!(geometry.kind(), kind);
                assert!(geometry.nb_entries().is_power_of_two());
            }
        }
    }
});
