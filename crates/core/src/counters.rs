//! What the core counts, per device and in total. Every auto-response and every refusal is
//! counted by its reason, so a run can be checked against its expected numbers exactly.

use std::ops::AddAssign;

use serde::{Deserialize, Serialize};

macro_rules! counters {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident: $ty:ty,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl AddAssign<&$name> for $name {
            fn add_assign(&mut self, other: &$name) {
                $(self.$field += &other.$field;)*
            }
        }
    };
}

counters! {
    /// Responses that carry a code, by code.
    pub struct CodeCounts {
        /// `SUCCESS`.
        pub success: u64,
        /// `INVALID`.
        pub invalid: u64,
        /// `FAILURE` (only when the device's policy allows it).
        pub failure: u64,
    }
}

counters! {
    /// Groups the host answered itself (always `INVALID`), by reason.
    pub struct AutoResponses {
        /// No handler was registered when the group completed.
        pub no_handler: u64,
        /// A handler was registered but no consumer had attached (`abi` still 0).
        pub not_attached: u64,
        /// The fault queue had no room for the group.
        pub queue_full: u64,
        /// The device already had its maximum of pending groups.
        pub pending_limit: u64,
        /// The group had more pages than the device's limit.
        pub group_too_large: u64,
        /// Pending when the handler was unregistered.
        pub unregister: u64,
        /// Pending when the VMM went away.
        pub vmm_gone: u64,
        /// Pending when the VMM broke a queue's protocol.
        pub queue_broken: u64,
        /// Not answered within the device's response timeout.
        pub timeout: u64,
        /// Pending when the VMM reset the device (`VFIO_USER_DEVICE_RESET`); the handler stayed.
        pub reset: u64,
    }
}

counters! {
    /// Responses that reached the device, by source.
    pub struct Responses {
        /// From the guest, through the response queue.
        pub guest: CodeCounts,
        /// From the host itself.
        pub auto: AutoResponses,
    }
}

counters! {
    /// Responses refused (they reached no device), by reason.
    pub struct Refusals {
        /// A field ABI v2 does not allow (reserved bits, zero cookie, bad code...).
        pub malformed: u64,
        /// A response version other than 1.
        pub bad_version: u64,
        /// The cookie names no group pending on this device: forged, duplicate, stale, timed
        /// out, or another device's.
        pub unknown_cookie: u64,
        /// The cookie is pending but the PASID or PRG index differs from the group's.
        pub mismatch: u64,
        /// Code `FAILURE`, which the device's policy refuses.
        pub failure_code: u64,
    }
}

counters! {
    /// Everything the core counts for one device (or, summed, for all of them).
    pub struct DeviceCounters {
        /// Unrecoverable faults reported.
        pub unrecoverable: u64,
        /// Unrecoverable faults published to the VMM.
        pub unrecoverable_delivered: u64,
        /// Unrecoverable faults dropped (queue full, no handler, no consumer).
        pub lost: u64,
        /// Page requests reported.
        pub page_requests: u64,
        /// Page requests dropped before their group completed (too many partial groups, a
        /// group over the page limit, no handler, or discarded at unregister).
        pub partial_dropped: u64,
        /// Page request groups completed (a `LAST_PAGE` request arrived).
        pub groups: u64,
        /// Groups published to the VMM.
        pub groups_delivered: u64,
        /// Responses that reached the device.
        pub responses: Responses,
        /// Responses refused.
        pub refused: Refusals,
        /// Handlers registered.
        pub registrations: u64,
        /// Handlers unregistered (by request, VMM gone, or broken queue).
        pub unregistrations: u64,
    }
}

impl DeviceCounters {
    /// Groups answered so far, from any source.
    pub fn answered(&self) -> u64 {
        let g = &self.responses.guest;
        let a = &self.responses.auto;
        g.success
            + g.invalid
            + g.failure
            + a.no_handler
            + a.not_attached
            + a.queue_full
            + a.pending_limit
            + a.group_too_large
            + a.unregister
            + a.vmm_gone
            + a.queue_broken
            + a.timeout
            + a.reset
    }

    /// Responses refused, all reasons.
    pub fn refused_total(&self) -> u64 {
        let r = &self.refused;
        r.malformed + r.bad_version + r.unknown_cookie + r.mismatch + r.failure_code
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answered_sums_every_guest_code_and_every_auto_reason() {
        // Each counter a different power of two: a sum that misses or subtracts one shows.
        let guest = CodeCounts {
            success: 1,
            invalid: 1 << 1,
            failure: 1 << 2,
        };
        let auto = AutoResponses {
            no_handler: 1 << 3,
            not_attached: 1 << 4,
            queue_full: 1 << 5,
            pending_limit: 1 << 6,
            group_too_large: 1 << 7,
            unregister: 1 << 8,
            vmm_gone: 1 << 9,
            queue_broken: 1 << 10,
            timeout: 1 << 11,
            reset: 1 << 12,
        };
        let counters = DeviceCounters {
            responses: Responses { guest, auto },
            page_requests: 1 << 20,
            groups: 1 << 21,
            ..DeviceCounters::default()
        };
        assert_eq!(counters.answered(), (1 << 13) - 1);
    }

    #[test]
    fn refused_total_sums_every_reason() {
        let counters = DeviceCounters {
            refused: Refusals {
                malformed: 1,
                bad_version: 1 << 1,
                unknown_cookie: 1 << 2,
                mismatch: 1 << 3,
                failure_code: 1 << 4,
            },
            ..DeviceCounters::default()
        };
        assert_eq!(counters.refused_total(), (1 << 5) - 1);
    }
}
