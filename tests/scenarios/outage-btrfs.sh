# The real host storage outage of the outage scenario with Btrfs (copy-on-write, its
# default) as the host file system: holdfast stops on the dm error table, refuses
# cont while storage is broken, resumes after it ends, and every acknowledged record
# is intact after dropping the host page cache and remounting.
set -u
NAME=outage-btrfs
HOST_FS=btrfs
. "$(dirname "$0")/outage.lib"
host_fs_outage_scenario
