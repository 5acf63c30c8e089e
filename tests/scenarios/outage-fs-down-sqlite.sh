# A real application across the host file system going down: SQLite in the guest
# (PRAGMA synchronous=FULL, one row per transaction, each committed row printed),
# its database on the guest's ext4, the guest's image a sparse file on a host ext4
# mounted with its defaults. The outage lasts until the host ext4 aborts its journal;
# cont is refused with EROFS; the operator detaches, repairs (e2fsck), mounts and
# attaches; cont replays into the image's holes and resumes. Afterwards every
# committed row is in the database, PRAGMA integrity_check says ok, and the guest's
# ext4 checks clean.
set -u
NAME=outage-fs-down-sqlite
DOWN_ERRNO=EROFS
GUEST_WORKLOAD=sqlite
RECORDS=400
. "$(dirname "$0")/outage.lib"
host_setup
sparse_image
holdfast_host_fs_down
host_teardown
echo "SCENARIO OK $NAME: SQLite in the guest; ext4 (defaults) aborted its journal under a sparse image; cont refused with EROFS; detached, repaired, attached; resumed; all $acked committed rows there, integrity_check ok, guest fs clean"
