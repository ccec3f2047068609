{{/* The gRPC methods the proxy passes to Triton: inference, and the read-only health / metadata /
model-config RPCs clients need (stac_backend/tools/nginx.py passes the same). */}}
{{- define "stac.passedRpcs" -}}
- ModelInfer
- ModelStreamInfer
- ServerLive
- ServerReady
- ModelReady
- ServerMetadata
- ModelMetadata
- ModelConfig
{{- end -}}

{{/* Envoy's configuration: gRPC listener, an allowlist of gRPC methods, ring hash on x-stream-id
over the headless Triton service. */}}
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
                        # Only inference and the read-only health / metadata RPCs reach Triton
                        # (the NGINX configs pass the same list) ...
                        {{- range (include "stac.passedRpcs" . | fromYamlArray) }}
                        - match: {path: /inference.GRPCInferenceService/{{ . }}}
                          route:
                            cluster: triton
                            timeout: 0s
                            hash_policy:
                              - header: {header_name: x-stream-id}
                                terminal: true
                              - connection_properties: {source_ip: true}
                        {{- end }}
                        # ... every other path (shared memory, model repository, logging, trace,
                        # statistics, anything unknown) is answered here with PERMISSION_DENIED,
                        # admin key or not: administration happens on the replicas' pod addresses.
                        - match: {prefix: /}
                          direct_response: {status: 403}
                          response_headers_to_add:
                            - header: {key: content-type, value: application/grpc}
                              append_action: OVERWRITE_IF_EXISTS_OR_ADD
                            - header: {key: grpc-status, value: "7"}
                              append_action: OVERWRITE_IF_EXISTS_OR_ADD
                            - header: {key: grpc-message, value: "this method is not served through the proxy"}
                              append_action: OVERWRITE_IF_EXISTS_OR_ADD
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
