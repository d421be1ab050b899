// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! A parsed request becomes a disk operation, or a refusal with its status
//! (R8): the one range check for guest requests and the one, exhaustive,
//! errno -> virtio status mapping. Pure: the caller builds the iovecs into
//! guest memory and writes the status.

use std::borrow::Cow;

use virtio_bindings::virtio_blk::VIRTIO_BLK_ID_BYTES;

use super::{
    request::{BlkRequest, RequestType, SECTOR, S_IOERR, S_OK, S_UNSUPP, WZ_UNMAP},
    DISCARD_ALIGN, MAX_DISCARD_SECTORS,
};
use crate::{
    disk::{check_range, DiskInfo, Op},
    engine::IoVecs,
};

/// The status byte of a finished disk operation, for every errno: the
/// operation is not supported by this device or file (EOPNOTSUPP, ENOTSUP,
/// ENOSYS, ENOTTY): UNSUPP; anything else that failed (EIO, ENOSPC, EROFS,
/// ESHUTDOWN, EINVAL, EFAULT, ...): IOERR, which is what virtio-blk has for
/// "the request failed". Success: OK.
pub fn status_of(result: Result<(), i32>) -> u8 {
    match result {
        Ok(()) => S_OK,
        Err(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENOTTY) => S_UNSUPP,
        #[allow(unreachable_patterns)] // ENOTSUP == EOPNOTSUPP on Linux
        Err(libc::ENOTSUP) => S_UNSUPP,
        Err(_) => S_IOERR,
    }
}

/// What to do with a request.
#[derive(Debug)]
pub enum Action {
    /// Hand this operation to the disk.
    Disk(Op),
    /// Answer GET_ID: write these bytes (at most the buffer's length).
    GetId([u8; VIRTIO_BLK_ID_BYTES as usize]),
}

/// A request refused before it reached the disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refusal {
    /// The status to answer.
    pub status: u8,
    /// Why, for the (rate-limited) log.
    pub why: Cow<'static, str>,
}

fn refuse(status: u8, why: impl Into<Cow<'static, str>>) -> Refusal {
    Refusal {
        status,
        why: why.into(),
    }
}

/// The GET_ID answer for `serial` (truncated to 20 bytes, zero padded).
pub fn id_bytes(serial: &str) -> [u8; VIRTIO_BLK_ID_BYTES as usize] {
    let mut id = [0u8; VIRTIO_BLK_ID_BYTES as usize];
    for (d, s) in id.iter_mut().zip(serial.bytes()) {
        *d = s;
    }
    id
}

/// Turns `req` into an action on a disk described by `info`. `data`
/// builds the iovecs of a read's or write's buffers (`None`: a buffer lies
/// outside guest memory); it is called only for those.
pub fn translate(
    req: &BlkRequest,
    info: &DiskInfo,
    serial: &str,
    data: impl FnOnce() -> Option<IoVecs>,
) -> Result<Action, Refusal> {
    // The size is live (resize): one reading for the whole request.
    let sectors = info.sectors();
    match req.rtype {
        RequestType::In | RequestType::Out => {
            if req.rtype == RequestType::Out && info.readonly {
                return Err(refuse(S_IOERR, "write to a read-only disk"));
            }
            check_range(req.sector, req.data_len / SECTOR, sectors)
                .map_err(|e| refuse(S_IOERR, e.to_string()))?;
            let iov = data().ok_or_else(|| refuse(S_IOERR, "data buffer outside guest memory"))?;
            let sector = req.sector;
            Ok(Action::Disk(if req.rtype == RequestType::In {
                Op::Read { sector, iov }
            } else {
                Op::Write { sector, iov }
            }))
        }
        RequestType::Flush => Ok(Action::Disk(Op::Flush)),
        RequestType::GetId => Ok(Action::GetId(id_bytes(serial))),
        RequestType::Discard | RequestType::WriteZeroes => {
            if info.readonly {
                return Err(refuse(S_IOERR, "discard/write-zeroes on a read-only disk"));
            }
            let [r] = req.ranges.as_slice() else {
                return Err(refuse(S_UNSUPP, "more than one discard/write-zeroes range"));
            };
            let nsect = u64::from(r.num_sectors);
            check_range(r.sector, nsect, sectors)
                .map_err(|e| refuse(S_IOERR, format!("discard/write-zeroes: {e}")))?;
            if r.num_sectors > MAX_DISCARD_SECTORS {
                return Err(refuse(
                    S_IOERR,
                    "discard/write-zeroes larger than max_discard_sectors",
                ));
            }
            if req.rtype == RequestType::Discard {
                if r.flags != 0 {
                    return Err(refuse(S_UNSUPP, "discard with flags"));
                }
                let align = u64::from(DISCARD_ALIGN);
                // check_range passed: the end is the device's or before it.
                let tail_ok = r.sector.checked_add(nsect) == Some(sectors);
                if r.sector.checked_rem(align) != Some(0)
                    || (nsect.checked_rem(align) != Some(0) && !tail_ok)
                {
                    return Err(refuse(S_IOERR, "discard not aligned to 4 KiB"));
                }
                Ok(Action::Disk(Op::Discard {
                    sector: r.sector,
                    nsect,
                }))
            } else {
                if r.flags & !WZ_UNMAP != 0 {
                    return Err(refuse(S_UNSUPP, "write-zeroes with unknown flags"));
                }
                Ok(Action::Disk(Op::WriteZeroes {
                    sector: r.sector,
                    nsect,
                    unmap: r.flags & WZ_UNMAP != 0,
                }))
            }
        }
        RequestType::Unsupported(t) => {
            Err(refuse(S_UNSUPP, format!("unsupported request type {t}")))
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::indexing_slicing)]
mod tests {
    use vm_memory::GuestAddress;

    use super::*;
    use crate::blk::request::Range;
    use crate::engine::AlignedBuf;

    fn info(sectors: u64, readonly: bool) -> DiskInfo {
        DiskInfo {
            size: crate::disk::DiskSize::new(sectors),
            readonly,
            path: "/d".into(),
            id: "id".into(),
            kind: "raw",
            direct: false,
        }
    }

    fn req(rtype: RequestType, sector: u64, len: u64, ranges: Vec<Range>) -> BlkRequest {
        BlkRequest {
            rtype,
            sector,
            data: Vec::new(),
            data_len: len,
            ranges,
            status: GuestAddress(0),
        }
    }

    fn buf(len: usize) -> Option<IoVecs> {
        Some(IoVecs::from_buf(AlignedBuf::new(len).unwrap(), len).0)
    }

    fn refused(r: Result<Action, Refusal>) -> u8 {
        r.err().map_or(S_OK, |e| e.status)
    }

    #[test]
    fn reads_and_writes_stay_inside_the_disk() {
        let d = info(100, false);
        let ok = translate(&req(RequestType::In, 99, 512, vec![]), &d, "", || buf(512));
        assert!(matches!(ok, Ok(Action::Disk(Op::Read { sector: 99, .. }))));
        let past = translate(&req(RequestType::Out, 99, 1024, vec![]), &d, "", || {
            buf(1024)
        });
        assert_eq!(refused(past), S_IOERR);
        let huge = translate(&req(RequestType::In, u64::MAX, 512, vec![]), &d, "", || {
            buf(512)
        });
        assert_eq!(refused(huge), S_IOERR);
        let no_mem = translate(&req(RequestType::In, 0, 512, vec![]), &d, "", || None);
        assert_eq!(refused(no_mem), S_IOERR);
    }

    #[test]
    fn a_read_only_disk_refuses_every_change() {
        let d = info(100, true);
        let w = translate(&req(RequestType::Out, 0, 512, vec![]), &d, "", || buf(512));
        assert_eq!(refused(w), S_IOERR);
        let r = Range {
            sector: 0,
            num_sectors: 8,
            flags: 0,
        };
        for t in [RequestType::Discard, RequestType::WriteZeroes] {
            assert_eq!(
                refused(translate(&req(t, 0, 0, vec![r]), &d, "", || None)),
                S_IOERR
            );
        }
        let rd = translate(&req(RequestType::In, 0, 512, vec![]), &d, "", || buf(512));
        assert!(rd.is_ok());
    }

    #[test]
    fn discard_and_write_zeroes_are_checked() {
        let d = info(100, false);
        let r = |sector, num_sectors, flags| Range {
            sector,
            num_sectors,
            flags,
        };
        let t = |rt, ranges| refused(translate(&req(rt, 0, 0, ranges), &d, "", || None));
        assert_eq!(t(RequestType::Discard, vec![r(8, 8, 0)]), S_OK);
        assert_eq!(
            t(RequestType::Discard, vec![r(4, 8, 0)]),
            S_IOERR,
            "misaligned"
        );
        assert_eq!(t(RequestType::Discard, vec![r(96, 4, 0)]), S_OK, "tail");
        assert_eq!(
            t(RequestType::Discard, vec![r(96, 8, 0)]),
            S_IOERR,
            "past end"
        );
        assert_eq!(t(RequestType::Discard, vec![r(8, 8, 1)]), S_UNSUPP, "flags");
        assert_eq!(
            t(RequestType::Discard, vec![r(0, 8, 0), r(8, 8, 0)]),
            S_UNSUPP
        );
        assert_eq!(t(RequestType::Discard, vec![]), S_UNSUPP);
        assert_eq!(t(RequestType::WriteZeroes, vec![r(3, 5, WZ_UNMAP)]), S_OK);
        assert_eq!(t(RequestType::WriteZeroes, vec![r(3, 5, 2)]), S_UNSUPP);
        let big = info(u64::from(MAX_DISCARD_SECTORS) * 2, false);
        let over = translate(
            &req(
                RequestType::WriteZeroes,
                0,
                0,
                vec![r(0, MAX_DISCARD_SECTORS + 1, 0)],
            ),
            &big,
            "",
            || None,
        );
        assert_eq!(refused(over), S_IOERR);
        let unknown = translate(
            &req(RequestType::Unsupported(99), 0, 0, vec![]),
            &d,
            "",
            || None,
        );
        assert_eq!(refused(unknown), S_UNSUPP);
    }

    #[test]
    fn get_id_is_the_serial_truncated_and_padded() {
        let d = info(1, false);
        let Ok(Action::GetId(id)) =
            translate(&req(RequestType::GetId, 0, 20, vec![]), &d, "abc", || None)
        else {
            panic!("GET_ID");
        };
        assert_eq!(&id[..4], b"abc\0");
        assert_eq!(
            id_bytes("0123456789012345678901234"),
            *b"01234567890123456789"
        );
    }

    #[test]
    fn every_errno_has_a_status() {
        assert_eq!(status_of(Ok(())), S_OK);
        for e in [libc::EOPNOTSUPP, libc::ENOTSUP, libc::ENOSYS, libc::ENOTTY] {
            assert_eq!(status_of(Err(e)), S_UNSUPP, "errno {e}");
        }
        for e in 1..200 {
            let s = status_of(Err(e));
            assert!(s == S_IOERR || s == S_UNSUPP, "errno {e}: {s}");
        }
        for e in [
            libc::EIO,
            libc::ENOSPC,
            libc::EROFS,
            libc::ESHUTDOWN,
            libc::EINVAL,
            libc::EFAULT,
        ] {
            assert_eq!(status_of(Err(e)), S_IOERR, "errno {e}");
        }
    }
}
