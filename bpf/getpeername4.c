/* cgroup/getpeername4, attached to each captured pod's cgroup: a socket DNS capture connected to
 * the DNS proxy (127.0.0.1:15053) reports the resolver it dialled as its peer, as a NATed one
 * would: glibc's connected UDP socket, a TCP query. (Outbound TCP that connect4 sent to Envoy
 * still reports 127.0.0.1:15001.)
 */
#include "capture.h"

int getpeername4(struct bpf_sock_addr *ctx)
{
	show_resolver4(ctx);
	return 1;
}
