# outage-btrfs with the host Btrfs mounted nodatacow, as VM image directories often
# are (libvirt sets +C on its pools): writes go in place, no copy-on-write.
set -u
NAME=outage-btrfs-nodatacow
HOST_FS=btrfs
BTRFS_DATACOW=nodatacow
. "$(dirname "$0")/outage.lib"
host_fs_outage_scenario
