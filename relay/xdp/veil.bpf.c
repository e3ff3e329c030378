// SPDX-License-Identifier: Apache-2.0
//
// Veil's kernel fast path: forwards the media of bound UDP legs of 2-party sessions before the
// kernel builds a socket buffer. The userspace relay (relay/src/xdp.rs) decides which legs are
// here: it fills `legs` when both legs of a 2-party session are bound over native UDP and
// reachable, and empties it on release, expiry, revocation, rebind, a third leg, or anything
// else that changes the session. This program only carries out that decision, and hands
// everything it is not sure of to userspace unchanged (XDP_PASS): binds, control messages,
// unknown sources, IPv4 options, fragments, a datagram of the wrong size or class, a leg past
// its expiry, a peer whose next hop it has not learned yet.
//
// What it enforces itself, on every datagram it forwards:
// - RFC 7983 classification and the size limits of the userspace path: RTP/RTCP (first byte
//   128-191, at least 12 bytes) and DTLS (20-63, at least 13), at most 1500 bytes of payload;
// - the leg's expiry (CLOCK_MONOTONIC, as bpf_ktime_get_ns reads it): past it, userspace
//   decides (it renews an extended session or drops the datagram as expired);
// - the leg's packet and bit rate limits from its ticket: the same token buckets as
//   relay/core/src/limit.rs (refilled for the time since the leg's previous datagram, one
//   second of burst), dropping what exceeds them (counted per leg and per CPU).
//
// The datagram leaves from the relay's media address, with the IPv4 header the relay's own
// UDP socket would write: TTL from the relay's namespace (net.ipv4.ip_default_ttl), TOS 0,
// DF set, and an IP ID counting up per destination from a random start, as Linux numbers a
// UDP socket's datagrams to one destination. Nothing of the sender's header crosses the
// relay: not its TTL (hop count), ID or TOS (OS fingerprint).

#include <linux/bpf.h>
#include <linux/if_ether.h>
#include <linux/ip.h>
#include <linux/udp.h>
#include <linux/in.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

// Mirrors of veil_protocol::wire: MIN_RTP_LEN, MIN_DTLS_LEN, MAX_DATAGRAM.
#define MIN_RTP_LEN 12
#define MIN_DTLS_LEN 13
#define MAX_DATAGRAM 1500

#define IP_DF 0x4000
#define IP_MF 0x2000
#define IP_OFFSET 0x1fff

// One leg's datagrams as they arrive: from the participant to the relay's media address.
// Addresses and ports in network byte order. (relay/src/xdp.rs: LegKey)
struct leg_key {
	__be32 src_ip;
	__be32 dst_ip;
	__be16 src_port;
	__be16 dst_port;
};

// What to do with them, and what the program kept. (relay/src/xdp.rs: LegValue)
struct leg_value {
	// Set by userspace.
	struct leg_key out; // where this leg's media goes: from the relay to the peer
	__u32 max_pps; // 0: unlimited
	__u64 max_bps; // bits per second; 0: unlimited
	__u64 expires_ns; // CLOCK_MONOTONIC
	// Kept by the program.
	__u64 last_ns; // the leg's previous datagram here
	__u64 pkt_credit; // micro-packets
	__u64 bit_credit; // milli-bits
	__u64 rx_packets; // media datagrams from this leg the program decided on
	__u64 rx_bytes;
	__u64 fwd_packets; // forwarded to the peer
	__u64 fwd_bytes;
	__u64 limited_packets; // dropped for the leg's rate limits
	__u32 ifindex; // where this leg's datagrams arrive (0: not learned yet)
	__u8 peer_mac[6]; // their next hop: the source MAC they arrive with
	__u8 own_mac[6]; // the relay's MAC on that interface: their destination MAC
	__u32 ip_id; // the next IP ID of this leg's media to the peer (userspace seeds it randomly)
	__u32 reserved;
};

// The TTL of what the program sends: the relay's namespace's net.ipv4.ip_default_ttl, written
// by the loader (a constant to the verifier: no lookup per datagram).
volatile const __u32 veil_ttl = 64;

// Per-CPU counters, by index. (relay/src/xdp.rs: Stat)
enum stat {
	STAT_FORWARDED_PACKETS,
	STAT_FORWARDED_BYTES,
	STAT_RATE_LIMITED,
	STAT_PASS_EXPIRED,
	STAT_PASS_NOT_MEDIA,
	STAT_PASS_PEER_UNKNOWN,
	STAT_MAX,
};

struct {
	__uint(type, BPF_MAP_TYPE_HASH);
	__uint(max_entries, 262144);
	__type(key, struct leg_key);
	__type(value, struct leg_value);
} legs SEC(".maps");

struct {
	__uint(type, BPF_MAP_TYPE_PERCPU_ARRAY);
	__uint(max_entries, STAT_MAX);
	__type(key, __u32);
	__type(value, __u64);
} stats SEC(".maps");

static __always_inline void count(__u32 what, __u64 n)
{
	__u64 *v = bpf_map_lookup_elem(&stats, &what);
	if (v)
		*v += n;
}

static __always_inline __u16 fold(__u32 sum)
{
	sum = (sum & 0xffff) + (sum >> 16);
	sum = (sum & 0xffff) + (sum >> 16);
	return (__u16)sum;
}

// RFC 1624: the checksum `check` after 16-bit word `from` became `to` (network order alike).
static __always_inline __u16 csum_replace(__u16 check, __u16 from, __u16 to)
{
	return ~fold((__u32)(__u16)~check + (__u16)~from + to);
}

static __always_inline __u16 csum_replace32(__u16 check, __be32 from, __be32 to)
{
	check = csum_replace(check, (__u16)(from >> 16), (__u16)(to >> 16));
	return csum_replace(check, (__u16)(from & 0xffff), (__u16)(to & 0xffff));
}

static __always_inline __u16 ip_checksum(struct iphdr *ip)
{
	__u16 *w = (__u16 *)ip;
	__u32 sum = 0;
#pragma unroll
	for (int i = 0; i < (int)(sizeof(*ip) / 2); i++)
		sum += w[i];
	return ~fold(sum);
}

// The token buckets of relay/core/src/limit.rs, in integers: refilled for the time since the
// previous datagram, at most one second of the rate. True if the datagram is admitted.
static __always_inline int admit(struct leg_value *v, __u64 elapsed_ns, __u32 len)
{
	if (v->max_pps == 0 && v->max_bps == 0)
		return 1;
	if (elapsed_ns > 1000000000ULL)
		elapsed_ns = 1000000000ULL;
	__u64 pkt_cap = (__u64)v->max_pps * 1000000ULL;
	__u64 bit_cap = v->max_bps * 1000ULL;
	__u64 pkt = v->pkt_credit + elapsed_ns * v->max_pps / 1000ULL;
	__u64 bit = v->bit_credit + elapsed_ns * v->max_bps / 1000000ULL;
	if (pkt > pkt_cap)
		pkt = pkt_cap;
	if (bit > bit_cap)
		bit = bit_cap;
	__u64 pkt_cost = 1000000ULL, bit_cost = (__u64)len * 8000ULL;
	int ok = (v->max_pps == 0 || pkt >= pkt_cost) && (v->max_bps == 0 || bit >= bit_cost);
	if (ok) {
		if (v->max_pps)
			pkt -= pkt_cost;
		if (v->max_bps)
			bit -= bit_cost;
	}
	v->pkt_credit = pkt;
	v->bit_credit = bit;
	return ok;
}

SEC("xdp")
int veil_fast_path(struct xdp_md *ctx)
{
	void *data = (void *)(long)ctx->data;
	void *end = (void *)(long)ctx->data_end;

	struct ethhdr *eth = data;
	if ((void *)(eth + 1) > end || eth->h_proto != bpf_htons(ETH_P_IP))
		return XDP_PASS;
	struct iphdr *ip = (void *)(eth + 1);
	if ((void *)(ip + 1) > end || ip->ihl != 5 || ip->version != 4 ||
	    ip->protocol != IPPROTO_UDP || (ip->frag_off & bpf_htons(IP_MF | IP_OFFSET)))
		return XDP_PASS;
	struct udphdr *udp = (void *)(ip + 1);
	if ((void *)(udp + 1) > end)
		return XDP_PASS;

	struct leg_key key = {
		.src_ip = ip->saddr,
		.dst_ip = ip->daddr,
		.src_port = udp->source,
		.dst_port = udp->dest,
	};
	struct leg_value *leg = bpf_map_lookup_elem(&legs, &key);
	if (!leg)
		return XDP_PASS;

	// Learn where this leg's datagrams come from, whatever they carry (a participant that
	// only receives sends KEEPALIVEs): its peer's entry sends there.
	if (leg->ifindex != ctx->ingress_ifindex)
		leg->ifindex = ctx->ingress_ifindex;
	__builtin_memcpy(leg->peer_mac, eth->h_source, ETH_ALEN);
	__builtin_memcpy(leg->own_mac, eth->h_dest, ETH_ALEN);

	// The datagram exactly as the headers say, and media by RFC 7983; anything else is
	// userspace's to classify and count.
	__u32 ip_len = bpf_ntohs(ip->tot_len);
	__u32 udp_len = bpf_ntohs(udp->len);
	__u8 *payload = (__u8 *)(udp + 1);
	if ((void *)(payload + 1) > end || udp_len < sizeof(*udp) ||
	    ip_len != sizeof(*ip) + udp_len || (void *)ip + ip_len > end) {
		count(STAT_PASS_NOT_MEDIA, 1);
		return XDP_PASS;
	}
	__u32 len = udp_len - sizeof(*udp);
	__u8 first = payload[0];
	int media = (first >= 128 && first <= 191 && len >= MIN_RTP_LEN) ||
		    (first >= 20 && first <= 63 && len >= MIN_DTLS_LEN);
	if (!media || len > MAX_DATAGRAM || udp->check == 0) {
		count(STAT_PASS_NOT_MEDIA, 1);
		return XDP_PASS;
	}

	__u64 now = bpf_ktime_get_ns();
	if (now >= leg->expires_ns) {
		count(STAT_PASS_EXPIRED, 1);
		return XDP_PASS;
	}

	__sync_fetch_and_add(&leg->rx_packets, 1);
	__sync_fetch_and_add(&leg->rx_bytes, len);
	// Any datagram keeps the leg alive and refills its buckets, admitted or not (leg.rs).
	__u64 elapsed = leg->last_ns && now > leg->last_ns ? now - leg->last_ns : 0;
	leg->last_ns = now;
	if (!admit(leg, elapsed, len)) {
		__sync_fetch_and_add(&leg->limited_packets, 1);
		count(STAT_RATE_LIMITED, 1);
		return XDP_DROP;
	}

	// The peer's own entry says where it is reached (next hop and interface), once it has
	// sent something through here.
	struct leg_key back = {
		.src_ip = leg->out.dst_ip,
		.dst_ip = leg->out.src_ip,
		.src_port = leg->out.dst_port,
		.dst_port = leg->out.src_port,
	};
	struct leg_value *peer = bpf_map_lookup_elem(&legs, &back);
	if (!peer || peer->ifindex == 0) {
		count(STAT_PASS_PEER_UNKNOWN, 1);
		return XDP_PASS;
	}
	__builtin_memcpy(eth->h_dest, peer->peer_mac, ETH_ALEN);
	__builtin_memcpy(eth->h_source, peer->own_mac, ETH_ALEN);

	// The UDP checksum covers the pseudo-header's addresses and the ports: updated for each.
	__u16 check = udp->check;
	check = csum_replace32(check, ip->saddr, leg->out.src_ip);
	check = csum_replace32(check, ip->daddr, leg->out.dst_ip);
	check = csum_replace(check, udp->source, leg->out.src_port);
	check = csum_replace(check, udp->dest, leg->out.dst_port);
	udp->check = check ? check : 0xffff;
	udp->source = leg->out.src_port;
	udp->dest = leg->out.dst_port;

	// The relay's own IPv4 header (tot_len, version, ihl and protocol are already right).
	ip->tos = 0;
	// (Not an atomic fetch-and-add, which needs -mcpu=v3: a leg's datagrams arrive on one
	// receive queue, so two CPUs numbering the same leg at once is rare, and costs a repeat.)
	__u32 id = leg->ip_id;
	leg->ip_id = id + 1;
	ip->id = bpf_htons((__u16)id);
	ip->frag_off = bpf_htons(IP_DF);
	ip->ttl = (__u8)veil_ttl;
	ip->saddr = leg->out.src_ip;
	ip->daddr = leg->out.dst_ip;
	ip->check = 0;
	ip->check = ip_checksum(ip);

	__sync_fetch_and_add(&leg->fwd_packets, 1);
	__sync_fetch_and_add(&leg->fwd_bytes, len);
	count(STAT_FORWARDED_PACKETS, 1);
	count(STAT_FORWARDED_BYTES, len);
	if (peer->ifindex == ctx->ingress_ifindex)
		return XDP_TX;
	return bpf_redirect(peer->ifindex, 0);
}

// Attached by tests and benchmarks to the far end of a veth whose near end sends with XDP_TX
// or a redirect: a veth drops (or stalls) such frames unless its peer runs an XDP program
// (../shared/XDP-NOTES.md). Passes everything.
SEC("xdp")
int veil_pass(struct xdp_md *ctx)
{
	(void)ctx;
	return XDP_PASS;
}

// No GPL-only helper is called, so the license need not be GPL-compatible.
char LICENSE[] SEC("license") = "Apache-2.0";
