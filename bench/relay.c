/* relay: a TCP forwarder that holds each direction back by a fixed one-way delay (bench/lan.py).

     relay DELAY_US LISTEN_ADDR:PORT=TARGET_ADDR:PORT ...

   For every mapping it accepts connections on LISTEN and connects each to TARGET. Per connection
   and direction a reader thread stamps what it reads with CLOCK_MONOTONIC and queues it; a writer
   thread sleeps (clock_nanosleep, TIMER_ABSTIME, 1 ns timer slack) until stamp + delay and writes
   it: bytes keep their order and each one arrives DELAY_US late (asyncio's timers resolve to ~1
   ms, too coarse for a 0.1 ms LAN). TCP_NODELAY on both sockets; EOF is passed on as a shutdown of
   the write side; an error on either socket ends both directions. Prints "ready" on stdout once
   every port listens. It exits on SIGTERM, or when the process that started it dies. */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define CHUNK 65536
#define QUEUE_MAX (4 << 20) /* bytes held per direction before the reader waits: keeps TCP's
                               flow control end to end (the links' rate caps stay in charge) */

typedef struct chunk {
    struct chunk *next;
    struct timespec due;
    ssize_t len; /* 0 = end of stream */
    char data[];
} chunk;

typedef struct conn conn;

typedef struct {
    conn *c;
    int src, dst;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    chunk *head, *tail;
    long queued;
} pipe_t;

struct conn {
    pipe_t p[2];
    int refs; /* threads still running; the last one closes both sockets */
    pthread_mutex_t mu;
};

typedef struct {
    struct sockaddr_in listen, target;
    int fd;
} mapping;

static long delay_ns;

static void die(const char *what) {
    perror(what);
    exit(1);
}

static struct sockaddr_in parse_addr(const char *s) {
    char host[64];
    const char *colon = strrchr(s, ':');
    if (!colon || colon - s >= (long)sizeof host) {
        fprintf(stderr, "relay: bad address %s (want A.B.C.D:PORT)\n", s);
        exit(2);
    }
    memcpy(host, s, colon - s);
    host[colon - s] = 0;
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(atoi(colon + 1))};
    if (inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        fprintf(stderr, "relay: bad IPv4 address %s\n", host);
        exit(2);
    }
    return a;
}

static void nodelay(int fd) {
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
}

static void push(pipe_t *p, chunk *k) {
    k->next = NULL;
    pthread_mutex_lock(&p->mu);
    while (p->queued >= QUEUE_MAX)
        pthread_cond_wait(&p->cv, &p->mu);
    p->queued += k->len;
    if (p->tail)
        p->tail->next = k;
    else
        p->head = k;
    p->tail = k;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
}

static chunk *pop(pipe_t *p) {
    pthread_mutex_lock(&p->mu);
    while (!p->head)
        pthread_cond_wait(&p->cv, &p->mu);
    chunk *k = p->head;
    p->head = k->next;
    if (!p->head)
        p->tail = NULL;
    p->queued -= k->len;
    pthread_cond_broadcast(&p->cv);
    pthread_mutex_unlock(&p->mu);
    return k;
}

static void release(conn *c) {
    pthread_mutex_lock(&c->mu);
    int last = --c->refs == 0;
    pthread_mutex_unlock(&c->mu);
    if (!last)
        return;
    close(c->p[0].src);
    close(c->p[0].dst);
    for (int i = 0; i < 2; i++) {
        pthread_mutex_destroy(&c->p[i].mu);
        pthread_cond_destroy(&c->p[i].cv);
    }
    pthread_mutex_destroy(&c->mu);
    free(c);
}

/* An error on one socket ends the connection: reads on both sockets then return 0. */
static void abort_conn(pipe_t *p) {
    shutdown(p->src, SHUT_RDWR);
    shutdown(p->dst, SHUT_RDWR);
}

static void *reader(void *arg) {
    pipe_t *p = arg;
    char buf[CHUNK]; /* on the 256 KiB thread stack */
    for (;;) {
        ssize_t len = read(p->src, buf, CHUNK);
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if (len < 0 && errno == EINTR)
            continue;
        if (len < 0) {
            abort_conn(p);
            len = 0;
        }
        chunk *k = malloc(sizeof(chunk) + len);
        if (!k)
            die("malloc");
        k->len = len;
        k->due = now;
        memcpy(k->data, buf, len);
        long ns = k->due.tv_nsec + delay_ns;
        k->due.tv_sec += ns / 1000000000L;
        k->due.tv_nsec = ns % 1000000000L;
        int end = k->len == 0;
        push(p, k);
        if (end)
            break;
    }
    release(p->c);
    return NULL;
}

static void *writer(void *arg) {
    pipe_t *p = arg;
    int broken = 0;
    prctl(PR_SET_TIMERSLACK, 1UL);
    for (;;) {
        chunk *k = pop(p);
        if (k->len == 0) {
            free(k);
            shutdown(p->dst, SHUT_WR);
            break;
        }
        if (delay_ns)
            while (clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME, &k->due, NULL) == EINTR)
                ;
        for (ssize_t off = 0; off < k->len && !broken;) {
            ssize_t n = send(p->dst, k->data + off, k->len - off, MSG_NOSIGNAL);
            if (n < 0 && errno == EINTR)
                continue;
            if (n <= 0) {
                broken = 1; /* drop the rest until the reader's end marker */
                abort_conn(p);
            } else
                off += n;
        }
        free(k);
    }
    release(p->c);
    return NULL;
}

static void spawn(void *(*f)(void *), void *arg) {
    pthread_t t;
    pthread_attr_t at;
    pthread_attr_init(&at);
    pthread_attr_setdetachstate(&at, PTHREAD_CREATE_DETACHED);
    pthread_attr_setstacksize(&at, 256 << 10);
    if (pthread_create(&t, &at, f, arg))
        die("pthread_create");
    pthread_attr_destroy(&at);
}

typedef struct {
    int fd;
    struct sockaddr_in target;
} pending;

/* Connects an accepted socket to its target, then runs its four threads. */
static void *connector(void *arg) {
    pending *pd = arg;
    int in = pd->fd, out = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (out < 0 || connect(out, (struct sockaddr *)&pd->target, sizeof pd->target) < 0) {
        char a[32];
        inet_ntop(AF_INET, &pd->target.sin_addr, a, sizeof a);
        fprintf(stderr, "relay: cannot connect to %s:%d: %s\n", a, ntohs(pd->target.sin_port),
                strerror(errno));
        if (out >= 0)
            close(out);
        close(in);
        free(pd);
        return NULL;
    }
    free(pd);
    nodelay(in);
    nodelay(out);
    conn *c = calloc(1, sizeof *c);
    if (!c)
        die("calloc");
    c->refs = 4;
    pthread_mutex_init(&c->mu, NULL);
    int ends[2][2] = {{in, out}, {out, in}};
    for (int i = 0; i < 2; i++) {
        pipe_t *p = &c->p[i];
        p->c = c;
        p->src = ends[i][0];
        p->dst = ends[i][1];
        pthread_mutex_init(&p->mu, NULL);
        pthread_cond_init(&p->cv, NULL);
    }
    for (int i = 0; i < 2; i++) {
        spawn(reader, &c->p[i]);
        spawn(writer, &c->p[i]);
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: relay DELAY_US LISTEN_ADDR:PORT=TARGET_ADDR:PORT ...\n");
        return 2;
    }
    prctl(PR_SET_PDEATHSIG, SIGTERM);
    if (getppid() == 1)
        return 1; /* the parent is already gone */
    delay_ns = (long)(atof(argv[1]) * 1000.0 + 0.5);
    int n = argc - 2;
    mapping *m = calloc(n, sizeof *m);
    struct pollfd *pf = calloc(n, sizeof *pf);
    for (int i = 0; i < n; i++) {
        char *eq = strchr(argv[i + 2], '=');
        if (!eq) {
            fprintf(stderr, "relay: bad mapping %s (want LISTEN=TARGET)\n", argv[i + 2]);
            return 2;
        }
        *eq = 0;
        m[i].listen = parse_addr(argv[i + 2]);
        m[i].target = parse_addr(eq + 1);
        int fd = socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0), one = 1;
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, sizeof one);
        if (bind(fd, (struct sockaddr *)&m[i].listen, sizeof m[i].listen) < 0) {
            fprintf(stderr, "relay: cannot listen on %s: %s\n", argv[i + 2], strerror(errno));
            return 1;
        }
        if (listen(fd, 64) < 0)
            die("listen");
        m[i].fd = pf[i].fd = fd;
        pf[i].events = POLLIN;
    }
    printf("ready\n");
    fflush(stdout);
    for (;;) {
        if (poll(pf, n, -1) < 0) {
            if (errno == EINTR)
                continue;
            die("poll");
        }
        for (int i = 0; i < n; i++) {
            if (!(pf[i].revents & POLLIN))
                continue;
            int fd = accept4(m[i].fd, NULL, NULL, SOCK_CLOEXEC);
            if (fd < 0)
                continue;
            pending *pd = malloc(sizeof *pd);
            pd->fd = fd;
            pd->target = m[i].target;
            spawn(connector, pd);
        }
    }
}
