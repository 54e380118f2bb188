// Flex Consumption plan (FC1) and the Python 3.11 Function App. Every connection is
// identity-based through the user-assigned identity: host storage (AzureWebJobsStorage__*), the
// deployment package container (functionAppConfig.deployment.storage) and the app's own data
// connection STORAGE (STORAGE__*). No key or connection string with a secret is set.
//
// Flex Consumption rejects FUNCTIONS_WORKER_RUNTIME, FUNCTIONS_EXTENSION_VERSION,
// WEBSITE_RUN_FROM_PACKAGE and the other settings replaced by functionAppConfig: do not add them.

@description('Azure region.')
param location string

@description('Function App name (also the host name: <name>.azurewebsites.net).')
param name string

@description('Flex Consumption plan name.')
param planName string

@description('Resource id of the user-assigned identity.')
param identityId string

@description('Client id of the user-assigned identity.')
param identityClientId string

@description('Blob endpoint of the host storage account (https://<account>.blob.core.windows.net/).')
param hostBlobEndpoint string

@description('Queue endpoint of the host storage account.')
param hostQueueEndpoint string

@description('Table endpoint of the host storage account.')
param hostTableEndpoint string

@description('Deployment package container in the host storage account.')
param deploymentContainerName string

@description('Blob endpoint of the data storage account (connection STORAGE).')
param dataBlobEndpoint string

@description('Queue endpoint of the data storage account (the blob trigger poison queue).')
param dataQueueEndpoint string

@description('Application Insights connection string (not a secret; ingestion requires Entra ID).')
param appInsightsConnectionString string

// Scale (functionAppConfig.scaleAndConcurrency)
@description('Upper bound of instances the app scales out to.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 100

// Only the sizes Microsoft.Web/sites@2024-04-01 is known to accept: 512 MB was reported refused
// by that API version (Azure/azure-rest-api-specs issue 40898, later reported working again in one
// region); add it back here once it deploys in your region.
// https://learn.microsoft.com/azure/azure-functions/flex-consumption-plan#instance-memory
@description('Memory of each instance in MB; CPU is allocated in proportion.')
@allowed([
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Concurrent HTTP invocations one instance takes before the platform adds another.')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int = 8

@description('Always-ready instances for the HTTP group (0: scale to zero, cold starts possible).')
@minValue(0)
@maxValue(1000)
param alwaysReadyInstances int = 0

@description('Zone-redundant plan: instances spread over availability zones (the platform then keeps at least two always-ready instances; use ZRS storage with it).')
param zoneRedundant bool = false

@description('Subnet for VNet integration (delegated to Microsoft.App/environments); empty: no VNet integration.')
param virtualNetworkSubnetId string = ''

@description('azd service name (azure.yaml `services`): the tag azd finds the app by.')
param azdServiceName string = 'api'

// Application settings read by detector/config.py (see docs/CONFIGURATION.md).
param modelVersion string = ''
param modelsContainerName string = 'models'
param modelCacheDir string = '/tmp/ptd-models'
param defaultModel string = 'lightgbm'
param batchInContainerName string = 'batch-in'
param batchOutContainerName string = 'batch-out'
param maxBatchRecords int = 10000
param maxInvoicesPerCustomer int = 2000
param maxBodyBytes int = 16777216
param maxInflightBodyBytes int = 25165824
param maxDecompressedBytes int = 402653184
param rateLimitPerMinute int = 0
param corsOrigins string = ''
param logLevel string = 'INFO'

// Built-in authentication (App Service "Easy Auth", Microsoft Entra ID): on when
// entraApiClientId names the API's app registration (docs/DEPLOYMENT_GUIDE.md, "Entra ID").
@description('Application (client) id of the API\'s app registration; empty: no built-in authentication (function keys only).')
param entraApiClientId string = ''

@description('Tenant that issues the tokens.')
param entraTenantId string = subscription().tenantId

@description('Application (client) ids of the client applications (the utility\'s systems) allowed to call; Easy Auth refuses tokens of any other application with 403.')
param allowedClientApplications array = []

@description('PTD_REQUIRED_ROLES: app roles the app checks per route (Scores.Read: scoring; Models.Read: model_info, features, metrics); empty: any allowed client application.')
param requiredAppRoles string = 'Scores.Read,Models.Read'

@description('PTD_REQUIRE_FUNCTION_KEY: with built-in authentication on, false lets the token alone in (auth level ANONYMOUS); true also requires a function key.')
param requireFunctionKey bool = true

@description('Tags for every resource.')
param tags object = {}

// Always-ready instances apply to the group of HTTP triggers ('http'); the blob trigger ('blob'
// group) is woken by its Event Grid webhook.
var alwaysReadyHttp = [
  {
    name: 'http'
    instanceCount: alwaysReadyInstances
  }
]

resource plan 'Microsoft.Web/serverfarms@2024-04-01' = {
  name: planName
  location: location
  tags: tags
  kind: 'functionapp'
  sku: {
    name: 'FC1'
    tier: 'FlexConsumption'
  }
  properties: {
    reserved: true
    // https://learn.microsoft.com/azure/azure-functions/functions-zone-redundancy (Flex Consumption, Bicep)
    zoneRedundant: zoneRedundant
  }
}

resource app 'Microsoft.Web/sites@2024-04-01' = {
  name: name
  location: location
  tags: union(tags, {
    'azd-service-name': azdServiceName
  })
  kind: 'functionapp,linux'
  identity: {
    type: 'UserAssigned'
    userAssignedIdentities: {
      '${identityId}': {}
    }
  }
  properties: {
    serverFarmId: plan.id
    httpsOnly: true
    virtualNetworkSubnetId: empty(virtualNetworkSubnetId) ? null : virtualNetworkSubnetId
    clientCertEnabled: false
    siteConfig: {
      minTlsVersion: '1.2'
      ftpsState: 'Disabled'
      http20Enabled: true
    }
    functionAppConfig: {
      deployment: {
        storage: {
          type: 'blobContainer'
          value: '${hostBlobEndpoint}${deploymentContainerName}'
          authentication: {
            type: 'UserAssignedIdentity'
            userAssignedIdentityResourceId: identityId
          }
        }
      }
      runtime: {
        name: 'python'
        version: '3.11'
      }
      scaleAndConcurrency: {
        maximumInstanceCount: maximumInstanceCount
        instanceMemoryMB: instanceMemoryMB
        alwaysReady: alwaysReadyInstances > 0 ? alwaysReadyHttp : []
        triggers: {
          http: {
            perInstanceConcurrency: httpPerInstanceConcurrency
          }
        }
      }
    }
  }
}

resource appSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: app
  name: 'appsettings'
  properties: {
    // Host storage, identity-based.
    AzureWebJobsStorage__blobServiceUri: hostBlobEndpoint
    AzureWebJobsStorage__queueServiceUri: hostQueueEndpoint
    AzureWebJobsStorage__tableServiceUri: hostTableEndpoint
    AzureWebJobsStorage__credential: 'managedidentity'
    AzureWebJobsStorage__clientId: identityClientId
    // The app's data connection STORAGE: models, batch-in, batch-out (and the trigger's poison queue).
    STORAGE__blobServiceUri: dataBlobEndpoint
    STORAGE__queueServiceUri: dataQueueEndpoint
    STORAGE__credential: 'managedidentity'
    STORAGE__clientId: identityClientId
    // Telemetry through OpenTelemetry, authenticated with the identity (local auth is off).
    APPLICATIONINSIGHTS_CONNECTION_STRING: appInsightsConnectionString
    APPLICATIONINSIGHTS_AUTHENTICATION_STRING: 'ClientId=${identityClientId};Authorization=AAD'
    // The Python worker then calls configure_azure_monitor itself (and the app does not: see
    // detector/telemetry.py), collecting the logs of this logger and its children only. Its
    // default, the root logger, would also ship the SDKs' and the exporter's own records.
    // https://github.com/Azure/azure-functions-python-worker/pull/1621
    PYTHON_APPLICATIONINSIGHTS_ENABLE_TELEMETRY: 'true'
    PYTHON_APPLICATIONINSIGHTS_LOGGER_NAME: 'detector'
    // Application settings (detector/config.py).
    PTD_MODEL_SOURCE: 'blob'
    PTD_MODEL_VERSION: modelVersion
    PTD_MODEL_CONTAINER: modelsContainerName
    PTD_MODEL_CACHE_DIR: modelCacheDir
    PTD_DEFAULT_MODEL: defaultModel
    PTD_BATCH_IN_CONTAINER: batchInContainerName
    PTD_BATCH_OUT_CONTAINER: batchOutContainerName
    PTD_MAX_BATCH_RECORDS: string(maxBatchRecords)
    PTD_MAX_INVOICES_PER_CUSTOMER: string(maxInvoicesPerCustomer)
    PTD_MAX_BODY_BYTES: string(maxBodyBytes)
    PTD_MAX_DECOMPRESSED_BYTES: string(maxDecompressedBytes)
    PTD_MAX_INFLIGHT_BODY_BYTES: string(maxInflightBodyBytes)
    // The host refuses a larger body (413) before it reaches the worker's memory (default
    // 100 MB). https://learn.microsoft.com/azure/azure-functions/functions-app-settings#functions_request_body_size_limit
    FUNCTIONS_REQUEST_BODY_SIZE_LIMIT: string(maxBodyBytes)
    PTD_RATE_LIMIT_PER_MINUTE: string(rateLimitPerMinute)
    PTD_CORS_ORIGINS: corsOrigins
    PTD_LOG_LEVEL: logLevel
    // Who calls (detector/identity.py): the app roles checked per route, and whether a function
    // key is still required next to the token. Both apply only with built-in authentication on.
    PTD_REQUIRED_ROLES: requiredAppRoles
    PTD_REQUIRE_FUNCTION_KEY: requireFunctionKey ? 'true' : 'false'
  }
}

var entraAuthEnabled = !empty(entraApiClientId)
// v1 access tokens (the app registration's default) carry the Application ID URI as audience,
// v2 ones the client id. None while authentication is off: no half-empty values are stored.
var entraAudiences = entraAuthEnabled ? ['api://${entraApiClientId}', entraApiClientId] : []

// Built-in authentication. On Flex Consumption the Functions host runs it itself when the site's
// auth configuration is enabled (environment variable WEBSITE_AUTH_ENABLED): it validates the
// bearer token (issuer, audience, allowed client applications) and passes the caller to the app
// in X-MS-CLIENT-PRINCIPAL*, headers it strips from the caller's request. Always deployed, so
// that emptying entraApiClientId turns it off again.
// https://learn.microsoft.com/azure/app-service/configure-authentication-provider-aad
resource authSettings 'Microsoft.Web/sites/config@2024-04-01' = {
  parent: app
  name: 'authsettingsV2'
  properties: {
    platform: {
      enabled: entraAuthEnabled
      runtimeVersion: '~1'
    }
    globalValidation: {
      requireAuthentication: true
      unauthenticatedClientAction: 'Return401'
      // Open without a token: the health probe (availability test, smoke test, load balancers),
      // the API description, and the blob trigger's Event Grid webhook (it carries the
      // blobs_extension system key; Event Grid sends no Entra token to it).
      excludedPaths: [
        '/api/health'
        '/api/openapi.json'
        '/api/docs'
        '/runtime/webhooks/blobs'
      ]
    }
    identityProviders: {
      azureActiveDirectory: {
        enabled: entraAuthEnabled
        registration: {
          clientId: entraApiClientId
          openIdIssuer: '${environment().authentication.loginEndpoint}${entraTenantId}/v2.0'
        }
        validation: {
          allowedAudiences: entraAudiences
          defaultAuthorizationPolicy: {
            allowedApplications: allowedClientApplications
          }
        }
      }
    }
    login: {
      tokenStore: {
        enabled: false // an API: no sessions, no stored tokens
      }
    }
    httpSettings: {
      requireHttps: true
      forwardProxy: {
        convention: 'NoProxy'
      }
    }
  }
}

// Code is deployed with Entra ID (azure/login OIDC + Azure/functions-action): no publishing
// user names or passwords.
resource ftpBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'ftp'
  properties: {
    allow: false
  }
}

resource scmBasicAuth 'Microsoft.Web/sites/basicPublishingCredentialsPolicies@2024-04-01' = {
  parent: app
  name: 'scm'
  properties: {
    allow: false
  }
}

output id string = app.id
output name string = app.name
output defaultHostName string = app.properties.defaultHostName
output planId string = plan.id
output entraAuthEnabled bool = entraAuthEnabled
