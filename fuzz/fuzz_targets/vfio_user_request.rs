//! The vfio-user server's message parser on arbitrary messages: header checks, then the
//! command's payload and fds. Never a panic; an accepted request always came from a message
//! within the protocol's size limit.
#![no_main]

use iopf_vfio_user::protocol::{Header, MAX_MESSAGE_SIZE};
use iopf_vfio_user::request::{check_command_header, decode_request};
use iopf_vfio_user::{RegionInfo, Version};
use libfuzzer_sys::fuzz_target;
use zerocopy::FromBytes;

fuzz_target!(|data: &[u8]| {
    let Some((&fd_count, data)) = data.split_first() else {
        return;
    };
    // The fds a message may carry: real ones, so that the decoder's ownership of them is real.
    let fds: Vec<_> = (0..fd_count % 4)
        .filter_map(|_| rustix::fs::memfd_create("fuzz", rustix::fs::MemfdFlags::CLOEXEC).ok())
        .collect();
    if let Ok((header, payload)) = Header::read_from_prefix(data)
        && let Ok(command) = check_command_header(&header)
    {
        let payload = &payload[..payload.len().min(MAX_MESSAGE_SIZE)];
        let _ = decode_request(command, payload, fds);
    }
    // The client's decoders of what a server sends back.
    let _ = Version::decode(data);
    let _ = RegionInfo::decode_reply(data, 9, u32::try_from(data.len()).unwrap_or(u32::MAX));
});
