{{/* Envoy's configuration: gRPC listener, ring hash on x-stream-id over the headless Triton service. */}}
{{- define "stac.envoyConfig" -}}
admin:
  address:
    socket_address: {address: 0.0.0.0, port_value: {{ .Values.proxy.adminPort }}}
static_resources:
  listeners:
    - name: grpc
      address:
        socket_address: {address: 0.0.0.0, port_value: {{ .Values.proxy.port }}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: stac
                codec_type: AUTO
                # a camera's gRPC stream lasts as long as the camera: no idle cut-off of streams
                stream_idle_timeout: 300s
                route_config:
                  virtual_hosts:
                    - name: triton
                      domains: ["*"]
                      routes:
                        - match: {prefix: /}
                          route:
                            cluster: triton
                            timeout: 0s
                            hash_policy:
                              - header: {header_name: x-stream-id}
                                terminal: true
                              - connection_properties: {source_ip: true}
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: triton
      type: STRICT_DNS
      dns_lookup_family: V4_ONLY
      dns_refresh_rate: 5s
      # Consistent hashing: a replica joining or leaving moves only ~1/N of the streams (they
      # restart with a new START on their new replica).
      lb_policy: RING_HASH
      ring_hash_lb_config: {minimum_ring_size: 1024}
      typed_extension_protocol_options:
        envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
          "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
          explicit_http_config:
            http2_protocol_options: {}
      outlier_detection:
        consecutive_gateway_failure: 3
        base_ejection_time: 10s
      load_assignment:
        cluster_name: triton
        endpoints:
          - lb_endpoints:
              - endpoint:
                  address:
                    socket_address:
                      address: {{ include "stac.fullname" . }}-triton.{{ .Release.Namespace }}.svc.cluster.local
                      port_value: 8001
{{- end -}}
