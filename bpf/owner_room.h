/* owner_room.h - room per owner in the cw map: one owner (the socket's uid) filling the map
 * with its own CLOSE_WAIT sockets must not leave the others' leaks unseen, silently. Each
 * owner may hold config.owner_room entries; a socket past that is counted as lost
 * (CW_STAT_OWNER_FULL: a loss, so the results say they are incomplete). The uid is read at
 * the BTF offset of sock.sk_uid (kfields.py); without it there is no limit per owner. */
#ifndef CW_OWNER_ROOM_H
#define CW_OWNER_ROOM_H

/* The uid a socket belongs to (its creator's; an accepted socket inherits its listener's). */
static __always_inline u32 sock_uid(u64 sk)
{
    u32 uid = 0;
#ifdef CW_HAVE_OWNER_ROOM
    bpf_probe_read_kernel(&uid, sizeof(uid), (char *)sk + CW_OFF_SOCK_UID);
#endif
    return uid;
}

/* Room for one more cw map entry of this socket's owner: 1 if taken, 0 if it has none. */
static __always_inline int take_room(struct cw_config *cfg, u64 sk)
{
#ifdef CW_HAVE_OWNER_ROOM
    if (!cfg->owner_room)
        return 1;
    u32 uid = sock_uid(sk);
    u32 *n = cw_per_owner.lookup(&uid);
    if (!n) {
        u32 one = 1;
        cw_per_owner.update(&uid, &one); /* full (4096 owners): no limit for this one */
        return 1;
    }
    if (*n >= cfg->owner_room) {
        stat_inc(CW_STAT_OWNER_FULL);
        return 0;
    }
    __sync_fetch_and_add(n, 1);
#endif
    return 1;
}

/* A socket of this owner left the cw map. Entries stay at zero: owners are few. */
static __always_inline void give_room(struct cw_config *cfg, u64 sk)
{
#ifdef CW_HAVE_OWNER_ROOM
    if (!cfg->owner_room)
        return;
    u32 uid = sock_uid(sk);
    u32 *n = cw_per_owner.lookup(&uid);
    if (n && *n)
        __sync_fetch_and_add(n, -1);
#endif
}

#endif /* CW_OWNER_ROOM_H */
