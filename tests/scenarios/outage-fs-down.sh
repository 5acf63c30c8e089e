# The host file system itself goes down under the guest, on a host as users have it:
# ext4 mounted with its defaults (a journal commit every 5 s), the guest's image
# preallocated on it. The outage lasts until ext4 aborts its journal (the kernel log
# must say so, or the scenario fails) and turns read-only: after the device is back,
# every cont is refused with EROFS and says what to do. The operator: x-block-detach,
# unmount, e2fsck, mount, x-block-attach, cont. holdfast replays and resumes; every
# acknowledged record is intact after dropping the host page cache and remounting,
# and the guest's own ext4 checks clean.
#
# Then the same outage under QEMU 10 werror=stop (default cache, then cache=none),
# which cannot let go of the image: its outcome is printed beside holdfast's.
set -u
NAME=outage-fs-down
DOWN_ERRNO=EROFS
. "$(dirname "$0")/outage.lib"
host_setup
copy_image
echo "IMAGE preallocated: $(du -k "$IMG" | cut -f1) KiB allocated of $(($(stat -c %s "$IMG") / 1024)) KiB"
holdfast_host_fs_down
h_acked=$acked h_lost=$lost
qemu_host_fs_down ""
set -- "QEMU werror=stop" "$q_resumed" "$q_finished" "$q_acked" "$q_lost"
qemu_row="QEMU werror=stop: resumed $q_resumed, lost $q_lost of $q_acked"
qemu_host_fs_down none
host_teardown
compare_row "ext4 host fs down" resumed "workload finished" acknowledged "acknowledged records lost"
compare_row "holdfast" yes yes "$h_acked" "$h_lost"
compare_row "$@"
compare_row "QEMU werror=stop cache=none" "$q_resumed" "$q_finished" "$q_acked" "$q_lost"
echo "SCENARIO OK $NAME: ext4 (defaults) aborted its journal; cont refused with EROFS; detached, repaired, attached; resumed; $h_acked acknowledged records intact after remount, guest fs clean. $qemu_row; with cache=none: resumed $q_resumed, lost $q_lost of $q_acked"
