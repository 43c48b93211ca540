/* sockops, attached to each captured pod's cgroup: when a redirected connect sends its SYN
 * (TCP_CONNECT_CB: the source port is chosen by then, and Envoy cannot have accepted yet), the
 * dialled address moves from the socket-cookie key to the app's (netns, address, port): the peer
 * Envoy sees on the connection it accepts, which is all getsockopt has to go by. A TCP query
 * DNS capture sent to the DNS proxy (:15053) keeps its cookie entry (getpeername reads it).
 */
#include "capture.h"

int sockops(struct bpf_sock_ops *skops)
{
	if (skops->op != BPF_SOCK_OPS_TCP_CONNECT_CB)
		return 1;
	__u64 cookie = bpf_get_socket_cookie(skops);
	struct origin *dialled = origin_by_cookie.lookup(&cookie);
	/* a query DNS capture sent to the proxy: Envoy never sees it; the resolver stays by cookie
	 * for getpeername. remote_port: network order in the upper half */
	if (!dialled || skops->remote_port == bpf_htonl(DNS_PROXY_PORT))
		return 1;
	struct origin copy = *dialled;
	struct peer_key key;
	__builtin_memset(&key, 0, sizeof(key));
	key.netns = bpf_get_netns_cookie(skops);
	__u32 ip6[4] = {CTX_READ(skops->local_ip6[0]), CTX_READ(skops->local_ip6[1]),
			CTX_READ(skops->local_ip6[2]), CTX_READ(skops->local_ip6[3])};
	sock_addr(key.addr, CTX_READ(skops->family), CTX_READ(skops->local_ip4), ip6);
	key.port = CTX_READ(skops->local_port);
	origin_by_peer.update(&key, &copy);
	origin_by_cookie.delete(&cookie);
	return 1;
}
