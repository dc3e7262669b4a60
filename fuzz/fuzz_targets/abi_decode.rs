//! The ABI decoders on arbitrary bytes: never a panic, and whatever decodes re-encodes to the
//! same bytes (one encoding per valid record).
#![no_main]

use iopf_abi::{FaultRecord, HostPageHeader, QueueGeometry, QueueKind, ResponseRecord};
use libfuzzer_sys::fuzz_target;
use zerocopy::{FromBytes, IntoBytes};

fuzz_target!(|data: &[u8]| {
    if let Ok((record, _)) = FaultRecord::read_from_prefix(data)
        && let Ok(fault) = record.decode()
    {
        assert_eq!(FaultRecord::from(&fault).as_bytes(), record.as_bytes());
    }
    if let Ok((record, _)) = ResponseRecord::read_from_prefix(data)
        && let Ok(response) = record.decode()
    {
        assert_eq!(
            ResponseRecord::from(&response).as_bytes(),
            record.as_bytes()
        );
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
