/*
 * A native MQTT-over-TLS client for the connect benchmark: C and the
 * system's OpenSSL, with the key loaded once, like a warm agent.
 *
 *   mqtt_tls_client HOST PORT CA_FILE CHAIN_FILE KEY_FILE CLIENT_ID
 *
 * With TPM2OPENSSL_TCTI and BENCH_PROVIDER_PATH set it loads the
 * default provider first and then tpm2 from that path, as the agent
 * does, so that only the key's own operations go to the TPM. It builds
 * one SSL_CTX and then, for each line read on stdin, opens a new TCP
 * connection, makes a full TLS 1.3 handshake (no resumption), sends an
 * MQTT 5 CONNECT, waits for a successful CONNACK, disconnects, and
 * prints the microseconds from connect() to the handshake's end and
 * to CONNACK. It stops at end of input, freeing the key, which
 * flushes it from the TPM.
 */
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <arpa/inet.h>
#include <openssl/err.h>
#include <openssl/provider.h>
#include <openssl/ssl.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static double now_us(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * 1e6 + ts.tv_nsec / 1e3;
}

static int fail(const char *what)
{
    fprintf(stderr, "error: %s\n", what);
    ERR_print_errors_fp(stderr);
    return 1;
}

static size_t mqtt5_connect(unsigned char *out, const char *client_id)
{
    size_t id = strlen(client_id);
    size_t n = 0;
    unsigned char variable[] = {0, 4, 'M', 'Q', 'T', 'T', 5, 2, 0, 60, 0};
    out[n++] = 0x10;
    out[n++] = (unsigned char)(sizeof variable + 2 + id);
    memcpy(out + n, variable, sizeof variable);
    n += sizeof variable;
    out[n++] = (unsigned char)(id >> 8);
    out[n++] = (unsigned char)id;
    memcpy(out + n, client_id, id);
    return n + id;
}

static int connect_once(SSL_CTX *ctx, struct sockaddr_in *address,
                        const char *host, const unsigned char *packet,
                        size_t size)
{
    static const unsigned char disconnect[] = {0xe0, 0x00};
    unsigned char reply[4];
    int one = 1, got = 0, status = 1;
    double began, handshake, connack;
    int fd = socket(AF_INET, SOCK_STREAM, 0);
    SSL *ssl = NULL;

    began = now_us();
    if (fd < 0 || connect(fd, (struct sockaddr *)address, sizeof *address))
        goto done;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    ssl = SSL_new(ctx);
    /* The broker's certificate must name the address, as in the agent. */
    X509_VERIFY_PARAM_set1_ip_asc(SSL_get0_param(ssl), host);
    SSL_set_fd(ssl, fd);
    if (SSL_connect(ssl) != 1)
        goto done;
    handshake = now_us();
    if (SSL_write(ssl, packet, (int)size) != (int)size)
        goto done;
    while (got < 4) {
        int n = SSL_read(ssl, reply + got, 4 - got);
        if (n <= 0)
            goto done;
        got += n;
    }
    connack = now_us();
    if (reply[0] != 0x20 || reply[3] != 0)
        goto done;
    SSL_write(ssl, disconnect, sizeof disconnect);
    printf("%.1f %.1f\n", handshake - began, connack - began);
    fflush(stdout);
    status = 0;
done:
    if (status)
        fail("connect failed");
    if (ssl) {
        SSL_shutdown(ssl);
        SSL_free(ssl);
    }
    if (fd >= 0)
        close(fd);
    return status;
}

int main(int argc, char **argv)
{
    struct sockaddr_in address = {0};
    unsigned char packet[128];
    char line[64];
    const char *path = getenv("BENCH_PROVIDER_PATH");
    SSL_CTX *ctx;
    size_t size;

    if (argc != 7 || strlen(argv[6]) > 100) {
        fprintf(stderr, "usage: %s HOST PORT CA CHAIN KEY CLIENT_ID\n",
                argv[0]);
        return 2;
    }
    if (path != NULL) {
        OSSL_PROVIDER_set_default_search_path(NULL, path);
        if (!OSSL_PROVIDER_load(NULL, "default") ||
            !OSSL_PROVIDER_load(NULL, "tpm2"))
            return fail("loading the providers");
    }

    ctx = SSL_CTX_new(TLS_client_method());
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_max_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_session_cache_mode(ctx, SSL_SESS_CACHE_OFF);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER, NULL);
    if (SSL_CTX_load_verify_locations(ctx, argv[3], NULL) != 1)
        return fail("reading the CA file");
    if (SSL_CTX_use_certificate_chain_file(ctx, argv[4]) != 1)
        return fail("reading the chain");
    if (SSL_CTX_use_PrivateKey_file(ctx, argv[5], SSL_FILETYPE_PEM) != 1)
        return fail("loading the key");

    address.sin_family = AF_INET;
    address.sin_port = htons((unsigned short)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &address.sin_addr) != 1)
        return fail("HOST must be an IPv4 address");
    size = mqtt5_connect(packet, argv[6]);

    printf("ready\n");
    fflush(stdout);
    while (fgets(line, sizeof line, stdin) != NULL)
        if (connect_once(ctx, &address, argv[1], packet, size))
            return 1;
    SSL_CTX_free(ctx);
    return 0;
}
