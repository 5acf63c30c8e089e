# The host file system goes down under the guest: Btrfs mounted with its defaults
# (copy-on-write). Its failure, as measured: about 30 s into the outage its
# transaction commit fails (delayed refs, EIO) and it forces itself read-only
# ("forced readonly"); every write then fails with EROFS, even after the device is
# back. The scenario fails if the kernel never says so. cont is refused with EROFS;
# the operator detaches, unmounts, mounts (Btrfs starts from its last committed
# transaction) and attaches; cont resumes; every acknowledged record is intact after
# a remount and the guest's ext4 checks clean.
set -u
NAME=outage-fs-down-btrfs
HOST_FS=btrfs
DOWN_ERRNO=EROFS
DOWN_WAIT=150
. "$(dirname "$0")/outage.lib"
host_fs_down_scenario
