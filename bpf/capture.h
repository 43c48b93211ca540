/* Shared by the capture hooks: the maps and their key layout (nodeagent/redirect/ebpf_maps.py
 * packs the same layout from Python; change both together).
 *
 * Keys are unique across pods: every pod netns has its own 127.0.0.1, so anything keyed by an
 * address also carries the netns cookie (bpf_get_netns_cookie), unique on the node for the
 * namespace's lifetime. Addresses are 16 bytes, IPv4 as ::ffff:a.b.c.d, in network order.
 */
#ifndef NODEAGENT_CAPTURE_H
#define NODEAGENT_CAPTURE_H

#include <uapi/linux/bpf.h>
#include <linux/in.h>
#include <linux/in6.h>

#define OUTBOUND_PORT 15001 /* Envoy's outbound capture listener in the pod (nodeagent.ports) */
#define HBONE_PORT 15008    /* never steered inbound (Istio's tunnel port) */
#define DNS_PORT 53         /* what DNS capture takes, UDP and TCP (nodeagent.ports) */
#define DNS_PROXY_PORT 15053 /* the agent's DNS proxy, 127.0.0.1 and ::1 in the pod */
#define LOCALHOST4 0x7f000001
#define PROBE_SOURCE 0xa9fe077f /* 169.254.7.127: kubelet probes, SNATed by the node */
#define LOOPBACK_IFINDEX 1  /* lo, in every netns */
#define MESH_MARK 0x539     /* SO_MARK of Envoy's own sockets */
#define MARK_MASK 0xfff     /* as Istio and nftables.py: only the low bits */
#define SO_ORIGINAL_DST 80  /* netfilter's, and IP6T_SO_ORIGINAL_DST: same number */
#define AF_INET 2
#define AF_INET6 10
#define SOL_IP 0
#define SOL_IPV6 41

/* pods[netns cookie].flags */
#define POD_CAPTURE_OUT 1  /* outbound TCP is captured (includeOutboundIPRanges is not "") */
#define POD_INCLUDE_ALL4 2 /* every IPv4 destination is included (includeOutboundIPRanges "*") */
#define POD_INCLUDE_ALL6 4
#define POD_CAPTURE_IN 8   /* inbound TCP is captured (includeInboundPorts is not "") */
#define POD_INBOUND_ALL 16 /* every inbound port but the excluded ones (includeInboundPorts "*") */
#define POD_CAPTURE_DNS 32 /* UDP and TCP to port 53 go to the DNS proxy (ISTIO_META_DNS_CAPTURE) */

/* ports_in values */
#define PORT_IN_EXCLUDED 1
#define PORT_IN_INCLUDED 2

struct pod_config {
	__u32 flags;
};

struct port_key { /* an excluded outbound port of one pod */
	__u64 netns;
	__u32 port; /* host order */
	__u32 pad;
};

struct addr_key { /* one of a pod's own addresses */
	__u32 addr[4];
};

struct range_key { /* LPM: prefixlen counts the 64 bits of netns, then address bits */
	__u32 prefixlen;
	__u32 netns[2];
	__u32 addr[4];
};

struct origin { /* what the app dialled */
	__u32 addr[4];
	__u16 port; /* network order */
	__u16 v4;
};

struct peer_key { /* the app's end of a redirected connection, as Envoy sees its peer */
	__u64 netns;
	__u32 addr[4];
	__u32 port; /* host order */
	__u32 pad;
};

BPF_TABLE_MAYBE_PINNED("hash", __u64, struct pod_config, pods, 65536, 0);
BPF_TABLE_MAYBE_PINNED("hash", struct port_key, __u8, ports_out, 65536, 0);
BPF_TABLE_MAYBE_PINNED("lpm_trie", struct range_key, __u8, ranges_ex, 65536, BPF_F_NO_PREALLOC);
BPF_TABLE_MAYBE_PINNED("lpm_trie", struct range_key, __u8, ranges_in, 65536, BPF_F_NO_PREALLOC);
BPF_TABLE_MAYBE_PINNED("hash", struct port_key, __u8, ports_in, 65536, 0);
/* sk_lookup cannot read its netns cookie (no bpf_get_netns_cookie there): it finds the pod by the
 * address the connection is for; pod IPs are unique on a node. */
BPF_TABLE_MAYBE_PINNED("hash", struct addr_key, __u64, pod_addrs, 65536, 0);
/* netns cookie -> the pod's inbound listener (0.0.0.0:15006 in its netns), inserted by the agent
 * from Envoy's file descriptor; the kernel drops the entry when the socket closes. */
BPF_TABLE_MAYBE_PINNED("sockhash", __u64, __u64, listeners, 65536, 0);
/* connect -> sockops: by socket cookie until the source port is known. A socket the DNS capture
 * redirected keeps its resolver here (recvmsg, getpeername read it): the last one dialled on the
 * socket wins, which is enough for resolver libraries (recvmsg4.c). */
BPF_TABLE_MAYBE_PINNED("lru_hash", __u64, struct origin, origin_by_cookie, 65536, 0);
/* sockops -> getsockopt: by the app's (netns, address, port), which Envoy sees as its peer */
BPF_TABLE_MAYBE_PINNED("lru_hash", struct peer_key, struct origin, origin_by_peer, 262144, 0);

/* A context field read as written: the verifier refuses context pointer arithmetic, which clang
 * emits when it merges the loads of two branches into one through a computed pointer. */
#define CTX_READ(field) (*(volatile typeof(field) *)&(field))

static __always_inline void v4_mapped(__u32 addr[4], __u32 ip4)
{
	addr[0] = 0;
	addr[1] = 0;
	addr[2] = bpf_htonl(0xffff);
	addr[3] = ip4;
}

static __always_inline int is_v4_mapped(const __u32 addr[4])
{
	return addr[0] == 0 && addr[1] == 0 && addr[2] == bpf_htonl(0xffff);
}

/* A socket's address as the maps keep addresses: IPv4 (FAMILY AF_INET) as ::ffff:IP4, else IP6.
 * IP4 and IP6 are context fields already read (CTX_READ). */
static __always_inline void sock_addr(__u32 addr[4], __u32 family, __u32 ip4, const __u32 ip6[4])
{
	if (family == AF_INET) {
		v4_mapped(addr, ip4);
		return;
	}
	addr[0] = ip6[0];
	addr[1] = ip6[1];
	addr[2] = ip6[2];
	addr[3] = ip6[3];
}

/* 1 when DST (port host order) is outside this pod's outbound capture, as nftables' output chain
 * says: loopback and the pod's own addresses (in ranges_ex), excluded ranges, not included
 * ranges, excluded ports. */
static __always_inline int outside_capture(__u64 netns, const struct pod_config *pod,
					   const __u32 dst[4], __u32 port)
{
	int v4 = is_v4_mapped(dst);
	if (v4 ? (bpf_ntohl(dst[3]) >> 24) == 127
	       : (dst[0] == 0 && dst[1] == 0 && dst[2] == 0 && dst[3] == bpf_htonl(1)))
		return 1;
	struct range_key key;
	__builtin_memset(&key, 0, sizeof(key));
	key.prefixlen = 64 + 128;
	__builtin_memcpy(key.netns, &netns, sizeof(netns));
	key.addr[0] = dst[0];
	key.addr[1] = dst[1];
	key.addr[2] = dst[2];
	key.addr[3] = dst[3];
	if (ranges_ex.lookup(&key))
		return 1;
	if (!(pod->flags & (v4 ? POD_INCLUDE_ALL4 : POD_INCLUDE_ALL6)) && !ranges_in.lookup(&key))
		return 1;
	struct port_key pk;
	__builtin_memset(&pk, 0, sizeof(pk));
	pk.netns = netns;
	pk.port = port;
	if (ports_out.lookup(&pk))
		return 1;
	return 0;
}

/* What a connect or sendmsg hook's socket address dialled (an IPv4 one; dialled6: an IPv6 one,
 * IPv4 on a dual-stack socket as ::ffff:a.b.c.d). */
static __always_inline void dialled4(struct bpf_sock_addr *ctx, struct origin *dialled)
{
	__builtin_memset(dialled, 0, sizeof(*dialled));
	v4_mapped(dialled->addr, ctx->user_ip4);
	dialled->port = (__u16)ctx->user_port;
	dialled->v4 = 1;
}

static __always_inline void dialled6(struct bpf_sock_addr *ctx, struct origin *dialled)
{
	__builtin_memset(dialled, 0, sizeof(*dialled));
	dialled->addr[0] = ctx->user_ip6[0];
	dialled->addr[1] = ctx->user_ip6[1];
	dialled->addr[2] = ctx->user_ip6[2];
	dialled->addr[3] = ctx->user_ip6[3];
	dialled->port = (__u16)ctx->user_port;
	dialled->v4 = is_v4_mapped(dialled->addr);
}

/* Point an IPv4 socket address at PORT on the pod's loopback (127.0.0.1). */
static __always_inline void to_loopback4(struct bpf_sock_addr *ctx, __u16 port)
{
	ctx->user_ip4 = bpf_htonl(LOCALHOST4);
	ctx->user_port = bpf_htons(port);
}

/* Point an IPv6 socket address at PORT on the pod's loopback: ::ffff:127.0.0.1 for an IPv4
 * destination dialled on a dual-stack socket (IPv4 traffic, where nftables would redirect its
 * IPv4 packets), else ::1. */
static __always_inline void to_loopback6(struct bpf_sock_addr *ctx, int v4, __u16 port)
{
	if (v4) {
		ctx->user_ip6[3] = bpf_htonl(LOCALHOST4);
	} else {
		ctx->user_ip6[0] = 0;
		ctx->user_ip6[1] = 0;
		ctx->user_ip6[2] = 0;
		ctx->user_ip6[3] = bpf_htonl(1);
	}
	ctx->user_port = bpf_htons(port);
}

/* The pod of a socket connecting or sending to DIALLED, when capture may take it: TCP (outbound
 * capture, DNS) or UDP to port 53 (DNS); never the mesh's own sockets (mark 0x539: Envoy's, the
 * DNS proxy's upstream queries). NULL: not in a pod, or nothing to capture. */
static __always_inline struct pod_config *pod_of(struct bpf_sock_addr *ctx,
						 const struct origin *dialled, __u64 *netns)
{
	__u32 protocol = ctx->protocol;
	if (protocol != IPPROTO_TCP &&
	    !(protocol == IPPROTO_UDP && dialled->port == bpf_htons(DNS_PORT)))
		return NULL;
	struct bpf_sock *sk = ctx->sk;
	if (!sk || (sk->mark & MARK_MASK) == MESH_MARK)
		return NULL;
	*netns = bpf_get_netns_cookie(ctx);
	return pods.lookup(netns);
}

/* Whether DNS capture sends DIALLED (TCP or UDP, pod_of) to the DNS proxy: port 53 in a pod
 * capturing DNS, whatever the resolver. nftables' DNS rule comes before every exclusion, so a
 * loopback resolver is captured too. DIALLED is remembered by the socket's cookie: the recvmsg
 * hooks give the proxy's replies its address, getpeername reports it as the peer. */
static __always_inline int to_dns_proxy(struct bpf_sock_addr *ctx, const struct pod_config *pod,
					struct origin *dialled)
{
	if (dialled->port != bpf_htons(DNS_PORT) || !(pod->flags & POD_CAPTURE_DNS))
		return 0;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	origin_by_cookie.update(&cookie, dialled);
	return 1;
}

/* Whether outbound capture redirects a connect to DIALLED: a TCP socket of a pod capturing
 * outbound, inside its capture; DIALLED is remembered by the socket's cookie until sockops learns
 * the source port. */
static __always_inline int remembered(struct bpf_sock_addr *ctx, __u64 netns,
				      const struct pod_config *pod, struct origin *dialled)
{
	if (ctx->protocol != IPPROTO_TCP || !(pod->flags & POD_CAPTURE_OUT))
		return 0;
	if (outside_capture(netns, pod, dialled->addr, bpf_ntohs(dialled->port)))
		return 0;
	__u64 cookie = bpf_get_socket_cookie(ctx);
	origin_by_cookie.update(&cookie, dialled);
	return 1;
}

/* The resolver a socket dialled when DNS capture sent it to the proxy, or NULL (recvmsg and
 * getpeername call this only when the address they see is the proxy's). */
static __always_inline struct origin *resolver_dialled(struct bpf_sock_addr *ctx)
{
	__u64 cookie = bpf_get_socket_cookie(ctx);
	struct origin *resolver = origin_by_cookie.lookup(&cookie);
	if (!resolver || resolver->port != bpf_htons(DNS_PORT))
		return NULL;
	return resolver;
}

/* What a TCP socket connect4/6 sent to Envoy's outbound listener had dialled, or NULL: sockops
 * keyed it by the socket's own (netns, address, port), as getsockopt finds it from Envoy's side.
 * (An entry outlives its connection until the LRU map evicts it or the port is reused: an app
 * dialling 127.0.0.1:15001 itself from a port a redirected connection used could read an older
 * destination; nothing but Envoy listens there.) */
static __always_inline struct origin *outbound_dialled(struct bpf_sock_addr *ctx)
{
	struct bpf_sock *sk = ctx->sk;
	if (!sk || ctx->protocol != IPPROTO_TCP)
		return NULL;
	struct peer_key key;
	__builtin_memset(&key, 0, sizeof(key));
	key.netns = bpf_get_netns_cookie(ctx);
	__u32 ip6[4] = {CTX_READ(sk->src_ip6[0]), CTX_READ(sk->src_ip6[1]), CTX_READ(sk->src_ip6[2]),
			CTX_READ(sk->src_ip6[3])};
	sock_addr(key.addr, CTX_READ(sk->family), CTX_READ(sk->src_ip4), ip6);
	key.port = CTX_READ(sk->src_port);
	return origin_by_peer.lookup(&key);
}

/* What a socket address that capture chose stands for: the DNS proxy (PORT 15053) stands for the
 * resolver dialled, Envoy's outbound listener (15001) for the destination dialled. NULL: another
 * address. */
static __always_inline struct origin *dialled_instead(struct bpf_sock_addr *ctx, __u16 port)
{
	if (port == bpf_htons(DNS_PROXY_PORT))
		return resolver_dialled(ctx);
	if (port == bpf_htons(OUTBOUND_PORT))
		return outbound_dialled(ctx);
	return NULL;
}

/* Whether an IPv6 socket address is on the pod's loopback: ::1, or ::ffff:127.0.0.1 (IPv4 on a
 * dual-stack socket). */
static __always_inline int is_loopback6(struct bpf_sock_addr *ctx)
{
	__u32 addr[4] = {CTX_READ(ctx->user_ip6[0]), CTX_READ(ctx->user_ip6[1]),
			 CTX_READ(ctx->user_ip6[2]), CTX_READ(ctx->user_ip6[3])};
	if (is_v4_mapped(addr))
		return addr[3] == bpf_htonl(LOCALHOST4);
	return addr[0] == 0 && addr[1] == 0 && addr[2] == 0 && addr[3] == bpf_htonl(1);
}

/* An IPv4 socket address that capture chose (a datagram's source, a socket's peer) reads as what
 * the socket dialled, as a NATed one would (dialled_instead); any other is left alone. */
static __always_inline void show_dialled4(struct bpf_sock_addr *ctx)
{
	if (ctx->user_ip4 != bpf_htonl(LOCALHOST4))
		return;
	struct origin *dialled = dialled_instead(ctx, (__u16)ctx->user_port);
	if (!dialled || !dialled->v4)
		return;
	ctx->user_ip4 = dialled->addr[3];
	ctx->user_port = dialled->port;
}

/* show_dialled4 for IPv6 socket addresses (an IPv4 destination as ::ffff:a.b.c.d). */
static __always_inline void show_dialled6(struct bpf_sock_addr *ctx)
{
	if (!is_loopback6(ctx))
		return;
	struct origin *dialled = dialled_instead(ctx, (__u16)ctx->user_port);
	if (!dialled)
		return;
	ctx->user_ip6[0] = dialled->addr[0];
	ctx->user_ip6[1] = dialled->addr[1];
	ctx->user_ip6[2] = dialled->addr[2];
	ctx->user_ip6[3] = dialled->addr[3];
	ctx->user_port = dialled->port;
}

#endif
