// Connect-time load balancing as Cilium's socket-LB and Calico eBPF's CTLB do it: a
// cgroup/connect4|6 program that rewrites connect() to a service VIP into a backend address,
// before any packet exists. The tests compile it with the addresses as -D defines:
//   VIP4, BACKEND4: IPv4 addresses as host-order u32; VIP6_0..3, BACKEND6_0..3: the four
//   32-bit words of IPv6 addresses, host order; VIP_PORT, BACKEND_PORT: host order;
//   HOSTNS_ONLY: rewrite only sockets of the initial network namespace (Cilium's
//   socketLB.hostNamespaceOnly=true), leaving every other namespace's connect() alone.
// A family whose VIP is not defined is left alone.
#include <linux/bpf.h>
#include <bpf/bpf_helpers.h>
#include <bpf/bpf_endian.h>

static __always_inline int other_netns(struct bpf_sock_addr *ctx)
{
#ifdef HOSTNS_ONLY
	// NULL: the initial network namespace's cookie.
	return bpf_get_netns_cookie(ctx) != bpf_get_netns_cookie(NULL);
#else
	return 0;
#endif
}

SEC("cgroup/connect4")
int connect4(struct bpf_sock_addr *ctx)
{
#ifdef VIP4
	if (other_netns(ctx))
		return 1;
	if (ctx->user_ip4 == bpf_htonl(VIP4) && ctx->user_port == bpf_htons(VIP_PORT)) {
		ctx->user_ip4 = bpf_htonl(BACKEND4);
		ctx->user_port = bpf_htons(BACKEND_PORT);
	}
#endif
	return 1; // allow the connect
}

SEC("cgroup/connect6")
int connect6(struct bpf_sock_addr *ctx)
{
#ifdef VIP6_0
	if (other_netns(ctx))
		return 1;
	if (ctx->user_ip6[0] == bpf_htonl(VIP6_0) && ctx->user_ip6[1] == bpf_htonl(VIP6_1) &&
	    ctx->user_ip6[2] == bpf_htonl(VIP6_2) && ctx->user_ip6[3] == bpf_htonl(VIP6_3) &&
	    ctx->user_port == bpf_htons(VIP_PORT)) {
		ctx->user_ip6[0] = bpf_htonl(BACKEND6_0);
		ctx->user_ip6[1] = bpf_htonl(BACKEND6_1);
		ctx->user_ip6[2] = bpf_htonl(BACKEND6_2);
		ctx->user_ip6[3] = bpf_htonl(BACKEND6_3);
		ctx->user_port = bpf_htons(BACKEND_PORT);
	}
#endif
	return 1;
}

char _license[] SEC("license") = "GPL";
