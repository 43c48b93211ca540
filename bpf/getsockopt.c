/* cgroup/getsockopt, attached once per node to the cgroup v2 root (the node's Envoy runs outside
 * every pod's cgroup, wherever its container puts it): answers SO_ORIGINAL_DST (SOL_IP) and
 * IP6T_SO_ORIGINAL_DST (SOL_IPV6) on a connection the connect hooks redirected, with what the
 * app dialled, so Envoy's original_dst listener filter works unchanged. Inbound that sk_lookup
 * steered is not NATed: where the kernel has no answer (no conntrack entry) on a TCP socket of
 * a pod whose inbound eBPF captures, the answer is the socket's own local address, which is
 * what the peer dialled (Envoy's original_dst cluster needs the filter to have "restored" it).
 * Any other getsockopt, and connections we did not redirect (nftables-captured pods: conntrack
 * answers), pass as the kernel answered them.
 */
#include "capture.h"

int getsockopt(struct bpf_sockopt *ctx)
{
	if (ctx->optname != SO_ORIGINAL_DST || (ctx->level != SOL_IP && ctx->level != SOL_IPV6))
		return 1;
	struct bpf_sock *sk = ctx->sk;
	if (!sk)
		return 1;
	struct peer_key key;
	__builtin_memset(&key, 0, sizeof(key));
	key.netns = bpf_get_netns_cookie(ctx);
	__u32 family = CTX_READ(sk->family), ip4 = CTX_READ(sk->dst_ip4);
	__u32 port = CTX_READ(sk->dst_port);
	__u32 ip6[4] = {CTX_READ(sk->dst_ip6[0]), CTX_READ(sk->dst_ip6[1]),
			CTX_READ(sk->dst_ip6[2]), CTX_READ(sk->dst_ip6[3])};
	sock_addr(key.addr, family, ip4, ip6);
	key.port = bpf_ntohs((__u16)port);
	struct origin *found = origin_by_peer.lookup(&key), local;
	struct origin *dialled = found;
	if (!found) {
		struct pod_config *pod = pods.lookup(&key.netns);
		if (ctx->retval == 0 || !pod || !(pod->flags & POD_CAPTURE_IN) ||
		    CTX_READ(sk->protocol) != IPPROTO_TCP)
			return 1;
		__builtin_memset(&local, 0, sizeof(local));
		__u32 src6[4] = {CTX_READ(sk->src_ip6[0]), CTX_READ(sk->src_ip6[1]),
				 CTX_READ(sk->src_ip6[2]), CTX_READ(sk->src_ip6[3])};
		sock_addr(local.addr, family, CTX_READ(sk->src_ip4), src6);
		local.v4 = is_v4_mapped(local.addr);
		local.port = bpf_htons((__u16)CTX_READ(sk->src_port)); /* src_port: host order */
		dialled = &local;
	}
	if (ctx->level == SOL_IP) {
		struct sockaddr_in *sin = ctx->optval;
		if (!dialled->v4 || (void *)(sin + 1) > ctx->optval_end)
			return 1;
		__builtin_memset(sin, 0, sizeof(*sin));
		sin->sin_family = AF_INET;
		sin->sin_port = dialled->port;
		sin->sin_addr.s_addr = dialled->addr[3];
		ctx->optlen = sizeof(*sin);
	} else {
		struct sockaddr_in6 *sin6 = ctx->optval;
		if ((void *)(sin6 + 1) > ctx->optval_end)
			return 1;
		__builtin_memset(sin6, 0, sizeof(*sin6));
		sin6->sin6_family = AF_INET6;
		sin6->sin6_port = dialled->port;
		sin6->sin6_addr.in6_u.u6_addr32[0] = dialled->addr[0];
		sin6->sin6_addr.in6_u.u6_addr32[1] = dialled->addr[1];
		sin6->sin6_addr.in6_u.u6_addr32[2] = dialled->addr[2];
		sin6->sin6_addr.in6_u.u6_addr32[3] = dialled->addr[3];
		ctx->optlen = sizeof(*sin6);
	}
	ctx->retval = 0;
	return 1;
}
