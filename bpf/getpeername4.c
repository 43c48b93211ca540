/* cgroup/getpeername4, attached to each captured pod's cgroup: a socket capture connected elsewhere
 * than it dialled reports what it dialled as its peer, as a NATed one would under nftables: one
 * DNS capture sent to the DNS proxy (127.0.0.1:15053; glibc's connected UDP socket, a TCP query)
 * reports the resolver, one connect4 sent to Envoy's outbound listener (127.0.0.1:15001) the
 * destination.
 */
#include "capture.h"

int getpeername4(struct bpf_sock_addr *ctx)
{
	show_dialled4(ctx);
	return 1;
}
