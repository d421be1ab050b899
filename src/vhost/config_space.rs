// SPDX-License-Identifier: Apache-2.0 OR BSD-3-Clause
//! The virtio-blk config space the device shows (a live size, the WCE byte).

use std::sync::atomic::Ordering;

use super::BlkBackend;
use crate::blk::{DISCARD_ALIGN, MAX_DISCARD_SECTORS};

/// Config space size (virtio_blk_config up to write_zeroes_may_unmap + pad).
pub const CONFIG_LEN: usize = 60;
/// Offset of the `writeback` byte in the config space.
pub(super) const CONFIG_WCE_OFFSET: u32 = 32;
/// Largest segment the guest may send.
/// (`size_max * seg_max` must fit in an i32: libblkio computes it so.)
pub(super) const SIZE_MAX: u32 = 1 << 20;
/// Most segments per request (stays below IOV_MAX).
pub(super) const SEG_MAX_CAP: u32 = 1022;

impl BlkBackend {
    pub(super) fn config_bytes(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        let mut put = |off: usize, v: &[u8]| {
            if let Some(d) = c.get_mut(off..off + v.len()) {
                d.copy_from_slice(v);
            }
        };
        let seg_max = u32::from(self.cfg.queue_size)
            .saturating_sub(2)
            .clamp(1, SEG_MAX_CAP);
        put(0, &self.disk.info().sectors().to_le_bytes());
        put(8, &SIZE_MAX.to_le_bytes());
        put(12, &seg_max.to_le_bytes());
        put(20, &512u32.to_le_bytes());
        put(24, &[3, 0]); // 4 KiB physical blocks, no offset
        put(26, &8u16.to_le_bytes()); // min_io_size: 8 sectors
        put(28, &0u32.to_le_bytes());
        put(
            32,
            &[u8::from(
                !self.cfg.writethrough && self.wce.load(Ordering::Acquire),
            )],
        );
        put(
            34,
            &u16::try_from(self.cfg.queues).unwrap_or(1).to_le_bytes(),
        );
        put(36, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(40, &1u32.to_le_bytes());
        put(44, &DISCARD_ALIGN.to_le_bytes());
        put(48, &MAX_DISCARD_SECTORS.to_le_bytes());
        put(52, &1u32.to_le_bytes());
        put(56, &[1]);
        c
    }
}

/// Offset into the device config. cloud-hypervisor addresses the config
/// space as in virtio-pci, starting at `VHOST_USER_CONFIG_OFFSET` (0x100);
/// QEMU and libblkio start at 0.
pub(super) fn config_offset(offset: u32) -> u32 {
    const VHOST_USER_CONFIG_OFFSET: u32 = 0x100;
    if offset >= VHOST_USER_CONFIG_OFFSET {
        offset - VHOST_USER_CONFIG_OFFSET
    } else {
        offset
    }
}
