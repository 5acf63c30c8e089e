# The host file system goes down under the guest: XFS mounted with its defaults,
# an outage that lasts until XFS shuts itself down on a failed log write (the kernel
# log must say so, or the scenario fails). After the device is back every cont is
# refused with EIO and says what to do; the operator detaches, unmounts, mounts
# (XFS recovers its log) and attaches; cont resumes; every acknowledged record is
# intact after a remount and the guest's ext4 checks clean.
set -u
NAME=outage-fs-down-xfs
HOST_FS=xfs
DOWN_ERRNO=EIO
DOWN_WAIT=150
. "$(dirname "$0")/outage.lib"
host_fs_down_scenario
