/* SPDX-License-Identifier: Apache-2.0 OR MIT */
/*
 * iopf ABI v2: the queue regions that carry I/O page faults from the host to a VMM and page
 * responses back. The same layout as the Rust crate `iopf-abi`; docs/ABI.md is the full
 * specification. Requires C11 (anonymous unions, _Static_assert) or C++11.
 *
 * Byte order: every field of every structure below is little-endian. On a big-endian CPU,
 * convert each field (le32toh, le64toh, ...) when reading and writing.
 *
 * A queue region is one memfd, sealed by the host with F_SEAL_SHRINK | F_SEAL_GROW |
 * F_SEAL_SEAL:
 *
 *   offset 0                 struct iopf_host_page   written only by the host
 *   offset 4096              struct iopf_vmm_page    written only by the VMM; the host trusts
 *                                                    nothing in it
 *   offset 8192 (`offset`)   nb_entries entries of entry_size bytes:
 *                              fault queue (kind 1):    struct iopf_fault_record, host writes
 *                              response queue (kind 2): struct iopf_response_record, VMM writes
 *
 * The rest of each header page is unused and zero.
 *
 * Indices and marks. Records are numbered by a free-running uint32_t index i that wraps;
 * record i lives at offset + (i % nb_entries) * entry_size. Its last 8 bytes are its mark,
 * IOPF_MARK(i). There is no producer index: the consumer's only index, cons (the next record
 * it reads), is `index` in the consumer's page (VMM page for the fault queue, host page for
 * the response queue), alone in that page's second cache line.
 *
 * Producer: write the record's other bytes, then store its mark with one 64-bit release store
 * (__atomic_store_n(&rec->mark, IOPF_MARK(i), __ATOMIC_RELEASE)); for a batch, store the
 * first record's mark last. Write record i only if i - cons < nb_entries (uint32_t), with
 * cons loaded with acquire ordering; reload cons only when the cached value leaves no room.
 * A cons that moves backwards or past the records marked is a protocol error.
 *
 * Consumer: load the mark of record cons with acquire ordering. IOPF_MARK(cons): the record
 * is there; copy it out, then re-read the mark (after an acquire fence) and refuse the record
 * if it changed. IOPF_MARK(cons - nb_entries) or 0: not yet. Anything else: protocol error.
 * After a batch, store cons with release ordering.
 *
 * Wake-up suppression (IOPF_FLAG_NEED_WAKEUP, in the consumer's page flags):
 *   consumer, about to sleep: set NEED_WAKEUP in its flags; full fence (__ATOMIC_SEQ_CST);
 *                             re-check the mark of record cons; block on the doorbell only if
 *                             it is still not there (clear NEED_WAKEUP when it wakes or finds
 *                             work).
 *   producer, after a batch:  store the batch's last mark (release); full fence
 *                             (__ATOMIC_SEQ_CST); kick the doorbell eventfd only if the
 *                             consumer's NEED_WAKEUP is set.
 */
#ifndef IOPF_ABI_H
#define IOPF_ABI_H

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#ifdef __cplusplus
#define IOPF_STATIC_ASSERT(expr, msg) static_assert(expr, msg)
#else
#define IOPF_STATIC_ASSERT(expr, msg) _Static_assert(expr, msg)
#endif

/* ---- Queue region ------------------------------------------------------------------------ */

/* iopf_host_page.magic: the bytes "IOPF" read as a little-endian uint32_t. */
#define IOPF_REGION_MAGIC 0x46504F49u
/* iopf_host_page.version. */
#define IOPF_REGION_VERSION 2u

/* iopf_host_page.kind. */
#define IOPF_QUEUE_KIND_FAULT 1u    /* host produces fault records, VMM consumes */
#define IOPF_QUEUE_KIND_RESPONSE 2u /* VMM produces response records, host consumes */

/* iopf_host_page.entry_size for each kind. */
#define IOPF_FAULT_ENTRY_SIZE 64u
#define IOPF_RESPONSE_ENTRY_SIZE 32u

/* Region layout. */
#define IOPF_PAGE_SIZE 4096u
#define IOPF_HOST_PAGE_OFFSET 0u
#define IOPF_VMM_PAGE_OFFSET 4096u
#define IOPF_ENTRIES_OFFSET 8192u

/* iopf_host_page.nb_entries: a power of two in [MIN, MAX]. */
#define IOPF_MIN_ENTRIES 2u
#define IOPF_MAX_ENTRIES 65536u

/* iopf_host_page.flags. */
#define IOPF_HOST_FLAG_LIVE (1u << 0) /* a fault handler is registered */
/* Bit 1 of either page's flags: the consumer of this queue is about to sleep. Meaningful in
 * the host page of a response queue and in the VMM page of a fault queue. */
#define IOPF_FLAG_NEED_WAKEUP (1u << 1)
/* Host page flags a response queue may carry; a fault queue's host page carries LIVE only. */
#define IOPF_HOST_FLAGS_ALL (IOPF_HOST_FLAG_LIVE | IOPF_FLAG_NEED_WAKEUP)
#define IOPF_VMM_FLAGS_ALL IOPF_FLAG_NEED_WAKEUP

/* iopf_vmm_page.abi of a VMM that speaks ABI v2 (0 = not attached). */
#define IOPF_VMM_ABI 2u

/* Offset of `index` in either header page: alone in the page's second cache line. */
#define IOPF_INDEX_OFFSET 64u

/* Bit 32 of every valid record mark: a zeroed slot never carries one. */
#define IOPF_MARK_VALID (UINT64_C(1) << 32)
/* The mark of record `index` (free-running uint32_t). */
#define IOPF_MARK(index) (IOPF_MARK_VALID | (uint64_t)(uint32_t)(index))

/* Host page, at offset 0. Written only by the host. */
struct iopf_host_page {
	uint32_t magic;      /* IOPF_REGION_MAGIC */
	uint16_t version;    /* IOPF_REGION_VERSION */
	uint16_t kind;       /* IOPF_QUEUE_KIND_* */
	uint32_t entry_size; /* 64 (fault queue) or 32 (response queue) */
	uint32_t nb_entries; /* power of two, 2..=65536 */
	uint32_t offset;     /* IOPF_ENTRIES_OFFSET */
	uint32_t flags;      /* IOPF_HOST_FLAG_LIVE, IOPF_FLAG_NEED_WAKEUP (response queue) */
	uint64_t lost;       /* fault queue: records dropped because the ring was full */
	uint64_t rejected;   /* response queue: responses refused (bad cookie, bad fields) */
	uint32_t reserved[6]; /* 0 */
	uint32_t index;      /* offset 64: response queue: cons; fault queue: 0 */
	uint32_t pad;        /* 0 */
};

/* VMM page, at offset 4096. Written only by the VMM; the host trusts nothing in it. */
struct iopf_vmm_page {
	uint32_t abi;          /* IOPF_VMM_ABI; 0 = not attached */
	uint32_t flags;        /* IOPF_FLAG_NEED_WAKEUP (fault queue only) */
	uint32_t reserved[14]; /* 0 */
	uint32_t index;        /* offset 64: fault queue: cons; response queue: unused */
};

/* Bytes a region of nb_entries entries of entry_size bytes needs. */
static inline uint64_t iopf_region_len(uint32_t entry_size, uint32_t nb_entries)
{
	return (uint64_t)IOPF_ENTRIES_OFFSET + (uint64_t)nb_entries * entry_size;
}

/* Offset in the region of the entry that free-running index `index` names. nb_entries must
 * be a power of two (a header that passed the checks of docs/ABI.md, "Attaching"). */
static inline uint64_t iopf_entry_offset(uint32_t entry_size, uint32_t nb_entries,
					 uint32_t index)
{
	return (uint64_t)IOPF_ENTRIES_OFFSET + (uint64_t)(index & (nb_entries - 1u)) * entry_size;
}

/* ---- Fault record (64 bytes): the seed's struct iommu_fault, cookie in its padding -------- */

/* iopf_fault_record.type. */
#define IOPF_FAULT_TYPE_UNRECOVERABLE 1u /* IOMMU_FAULT_DMA_UNRECOV */
#define IOPF_FAULT_TYPE_PAGE_REQUEST 2u  /* IOMMU_FAULT_PAGE_REQ */

/* Unrecoverable fault reason (enum iommu_fault_reason). */
#define IOPF_FAULT_REASON_UNKNOWN 0u
#define IOPF_FAULT_REASON_PASID_FETCH 1u
#define IOPF_FAULT_REASON_BAD_PASID_ENTRY 2u
#define IOPF_FAULT_REASON_PASID_INVALID 3u
#define IOPF_FAULT_REASON_WALK_EABT 4u
#define IOPF_FAULT_REASON_PTE_FETCH 5u
#define IOPF_FAULT_REASON_PERMISSION 6u
#define IOPF_FAULT_REASON_ACCESS 7u
#define IOPF_FAULT_REASON_OOR_ADDRESS 8u

/* perm, in both fault types (IOMMU_FAULT_PERM_*). */
#define IOPF_FAULT_PERM_READ (1u << 0)
#define IOPF_FAULT_PERM_WRITE (1u << 1)
#define IOPF_FAULT_PERM_EXEC (1u << 2)
#define IOPF_FAULT_PERM_PRIV (1u << 3)
#define IOPF_FAULT_PERM_ALL                                                                     \
	(IOPF_FAULT_PERM_READ | IOPF_FAULT_PERM_WRITE | IOPF_FAULT_PERM_EXEC |                  \
	 IOPF_FAULT_PERM_PRIV)

/* Page request flags (IOMMU_FAULT_PAGE_REQUEST_*). */
#define IOPF_PAGE_REQUEST_PASID_VALID (1u << 0)
#define IOPF_PAGE_REQUEST_LAST_PAGE (1u << 1)
#define IOPF_PAGE_REQUEST_PRIV_DATA (1u << 2)
#define IOPF_PAGE_REQUEST_FLAGS_ALL                                                             \
	(IOPF_PAGE_REQUEST_PASID_VALID | IOPF_PAGE_REQUEST_LAST_PAGE | IOPF_PAGE_REQUEST_PRIV_DATA)

/* Unrecoverable fault flags (IOMMU_FAULT_UNRECOV_*). */
#define IOPF_UNRECOV_PASID_VALID (1u << 0)
#define IOPF_UNRECOV_ADDR_VALID (1u << 1)
#define IOPF_UNRECOV_FETCH_ADDR_VALID (1u << 2)
#define IOPF_UNRECOV_FLAGS_ALL                                                                  \
	(IOPF_UNRECOV_PASID_VALID | IOPF_UNRECOV_ADDR_VALID | IOPF_UNRECOV_FETCH_ADDR_VALID)

/* Largest PASID (20 bits) and PRG index (9 bits). */
#define IOPF_PASID_MAX 0xFFFFFu
#define IOPF_PRG_INDEX_MAX 511u

/* Page request view (type 2), bytes 8..55 of the record. */
struct iopf_fault_page_request {
	uint32_t flags;           /* IOPF_PAGE_REQUEST_* */
	uint32_t pasid;           /* if PASID_VALID, else 0 */
	uint32_t grpid;           /* PRG index, 9 bits */
	uint32_t perm;            /* IOPF_FAULT_PERM_* */
	uint64_t addr;            /* page address, 4 KiB aligned */
	uint64_t private_data[2]; /* if PRIV_DATA, else 0 */
	uint64_t reserved;        /* 0 */
};

/* Unrecoverable fault view (type 1), bytes 8..55 of the record. */
struct iopf_fault_unrecoverable {
	uint32_t reason;      /* IOPF_FAULT_REASON_*, 0..=8 */
	uint32_t flags;       /* IOPF_UNRECOV_* */
	uint32_t pasid;       /* if PASID_VALID, else 0 */
	uint32_t perm;        /* IOPF_FAULT_PERM_* */
	uint64_t addr;        /* if ADDR_VALID, else 0 */
	uint64_t fetch_addr;  /* if FETCH_ADDR_VALID, else 0 */
	uint64_t reserved[2]; /* 0 */
};

/* One fault queue entry. Written only by the host. Fields a record's flags mark absent, and
 * every reserved field, are zero. A group's records are published together, in arrival order,
 * its LAST_PAGE record last, all with the group's cookie. */
struct iopf_fault_record {
	uint32_t type;   /* IOPF_FAULT_TYPE_* */
	uint32_t cookie; /* page request: the group's cookie (non-zero); unrecoverable: 0 */
	union {
		struct iopf_fault_unrecoverable event; /* type 1 */
		struct iopf_fault_page_request prm;    /* type 2 */
	};
	uint64_t mark; /* IOPF_MARK(index), stored last with release ordering */
};

/* ---- Response record (32 bytes): the seed's struct iommu_page_response v1, plus cookie ---- */

/* iopf_response_record.version. */
#define IOPF_RESPONSE_VERSION 1u

/* iopf_response_record.flags. */
#define IOPF_RESPONSE_PASID_VALID (1u << 0)

/* iopf_response_record.code (enum iommu_page_response_code). */
#define IOPF_RESPONSE_SUCCESS 0u
#define IOPF_RESPONSE_INVALID 1u
#define IOPF_RESPONSE_FAILURE 2u /* refused unless the device's policy allows it */

/* One response queue entry. Written only by the VMM. The host accepts it only if cookie names
 * a group pending on the device, pasid/grpid equal the group's and version is 1. */
struct iopf_response_record {
	uint32_t version;  /* IOPF_RESPONSE_VERSION */
	uint32_t flags;    /* IOPF_RESPONSE_PASID_VALID */
	uint32_t pasid;    /* the group's PASID if PASID_VALID, else 0 */
	uint32_t grpid;    /* the group's PRG index */
	uint32_t code;     /* IOPF_RESPONSE_* */
	uint32_t cookie;   /* the group's cookie */
	uint64_t mark;     /* IOPF_MARK(index), stored last with release ordering */
};

IOPF_STATIC_ASSERT(sizeof(struct iopf_host_page) == 72, "iopf_host_page is 72 bytes");
IOPF_STATIC_ASSERT(sizeof(struct iopf_vmm_page) == 68, "iopf_vmm_page is 68 bytes");
IOPF_STATIC_ASSERT(sizeof(struct iopf_fault_page_request) == 48,
		   "iopf_fault_page_request is 48 bytes");
IOPF_STATIC_ASSERT(sizeof(struct iopf_fault_unrecoverable) == 48,
		   "iopf_fault_unrecoverable is 48 bytes");
IOPF_STATIC_ASSERT(sizeof(struct iopf_fault_record) == IOPF_FAULT_ENTRY_SIZE,
		   "iopf_fault_record is 64 bytes");
IOPF_STATIC_ASSERT(sizeof(struct iopf_response_record) == IOPF_RESPONSE_ENTRY_SIZE,
		   "iopf_response_record is 32 bytes");

#ifdef __cplusplus
}
#endif

#endif /* IOPF_ABI_H */
