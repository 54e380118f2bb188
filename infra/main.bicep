// Power theft detector: the whole environment in one resource group.
//
//   identity           user-assigned managed identity of the Function App
//   storage            data account: models (versioned, soft delete), batch-in, batch-out, the
//                      Event Grid dead-letter container; CanNotDelete lock; blob data-plane logs
//   host-storage       AzureWebJobsStorage + deployment package container (host-only rights)
//   storage-roles      least-privilege, container-scoped roles on the data account
//   monitoring         Log Analytics + Application Insights (local auth off)
//   workbook           the operators' dashboard (Azure Monitor workbook)
//   activity-log       the subscription's Activity Log to Log Analytics (optional)
//   network            optional isolation (vnetEnabled): VNet, private DNS, private endpoints
//   function-app       Flex Consumption plan (FC1, optionally zone-redundant) + Python 3.11 app
//   eventgrid          Event Grid system topic on the data account (blob trigger source), its
//                      identity (dead-lettering) and delivery-failure logs
//   alerts             action group (e-mail and/or webhook) + log and metric alerts
//
// Deployed by .github/workflows/deploy.yml (what-if, then azure/bicep-deploy) or by `azd up`
// (azure.yaml). The Event Grid subscription and the availability test need keys that exist only
// once the code runs: infra/post-deploy.bicep, deployed by scripts/post-deploy.sh after the code.
targetScope = 'resourceGroup'

@description('Azure region of every resource; must offer Flex Consumption.')
param location string = resourceGroup().location

@description('Short application name used in resource names (lowercase letters and digits).')
@minLength(2)
@maxLength(8)
param appName string = 'ptd'

@description('Stage name, part of resource names and of the unique suffix.')
@allowed([
  'dev'
  'test'
  'prod'
])
param environmentName string = 'dev'

@description('Data storage redundancy: Standard_LRS, or GRS/ZRS/GZRS for geo- or zone-redundancy.')
@allowed([
  'Standard_LRS'
  'Standard_GRS'
  'Standard_ZRS'
  'Standard_GZRS'
])
param storageSku string = 'Standard_LRS'

@description('Days before files in batch-in and batch-out (and their versions) are deleted.')
@minValue(1)
@maxValue(3650)
param batchRetentionDays int = 30

@description('Days a deleted or overwritten model blob or a deleted container can be restored.')
@minValue(1)
@maxValue(365)
param softDeleteRetentionDays int = 30

@description('Days each version of a model file, manifest, audit event or pointer stays immutable in the models container (version-level WORM); 0 turns it off.')
@minValue(0)
@maxValue(146000)
param modelsImmutabilityDays int = 30

@description('Flex Consumption: maximum number of instances.')
@minValue(1)
@maxValue(1000)
param maximumInstanceCount int = 100

// 512 is left out: reported refused by Microsoft.Web/sites@2024-04-01 (the API version of
// modules/function-app.bicep; Azure/azure-rest-api-specs issue 40898).
@description('Flex Consumption: memory per instance in MB (2048 or 4096 with the API version in use).')
@allowed([
  2048
  4096
])
param instanceMemoryMB int = 2048

@description('Zone redundancy: a zone-redundant Flex Consumption plan, and zone-redundant storage (ZRS, or GZRS for a geo-redundant storageSku) for both accounts.')
param zoneRedundant bool = false

@description('Network isolation (off by default, as in Microsoft\'s samples): VNet integration of the app, private endpoints for the data and host accounts, and their firewalls set to deny.')
param vnetEnabled bool = false

@description('With vnetEnabled: public IP ranges (CIDR) the storage firewalls still let in, e.g. a self-hosted runner or the operators\' network; the GitHub-hosted runners\' addresses are not fixed.')
param allowedIpRanges array = []

@description('Flex Consumption: concurrent HTTP invocations per instance (triggers.http.perInstanceConcurrency).')
@minValue(1)
@maxValue(1000)
param httpPerInstanceConcurrency int = 8

@description('Flex Consumption: always-ready instances for HTTP; 0 scales to zero (cold starts), more costs money.')
@minValue(0)
@maxValue(1000)
param alwaysReadyInstances int = 0

// The principal running the deployment (the GitHub OIDC service principal, or the user of
// `azd up`) by default, as Azure-Samples/functions-quickstart-python-azd-eventgrid-blob does:
// without the role, ptd publish fails with 403 on the first deploy.
@description('Object id of the deployment principal: gets Blob Data Contributor on models (ptd publish/activate) and on batch-in/batch-out (the post-deploy smoke test). Default: whoever deploys; empty: no assignment.')
param deployerPrincipalId string = deployer().objectId

@description('Principal type of deployerPrincipalId; empty lets Azure look it up (right for both a service principal and a user).')
@allowed([
  ''
  'ServicePrincipal'
  'User'
  'Group'
])
param deployerPrincipalType string = ''

@description('Deploy the action group and the alert rules. They need a receiver: alertEmail and/or alertWebhookUrl (the deployment fails without one). false: no alerts at all, explicitly.')
param alertsEnabled bool = true

@description('E-mail address that receives alerts.')
param alertEmail string = ''

@description('Webhook that receives alerts (common alert schema), e.g. a Teams or PagerDuty URL.')
@secure()
param alertWebhookUrl string = ''

@description('Rate and percentile alerts ignore 5-minute bins with fewer requests than this.')
@minValue(1)
param alertMinRequests int = 20

@description('Send the subscription\'s Activity Log to this stage\'s Log Analytics workspace (needs diagnosticSettings/write on the subscription).')
param activityLogEnabled bool = true

@description('CanNotDelete lock on the data storage account.')
param lockDataAccount bool = true

@description('azd environment name (AZURE_ENV_NAME, set by azd): tagged azd-env-name on every resource; empty outside azd.')
param azdEnvName string = ''

@description('Alert threshold: percent of requests answered 5xx in a 5-minute bin.')
@minValue(1)
@maxValue(100)
param http5xxPercentThreshold int = 5

@description('Alert threshold: p95 request duration in milliseconds.')
@minValue(100)
param p95LatencyThresholdMs int = 2000

@description('Days Log Analytics keeps telemetry.')
@minValue(30)
@maxValue(730)
param logRetentionDays int = 30

// Application settings (detector/config.py; docs/CONFIGURATION.md).
@description('PTD_MODEL_VERSION: pin a published model version; empty follows the pointer in the models container.')
param modelVersion string = ''

@description('PTD_DEFAULT_MODEL: model used when a request names none.')
@allowed([
  'lightgbm'
  'random_forest'
  'logistic_regression'
])
param defaultModel string = 'lightgbm'

@description('PTD_MAX_BATCH_RECORDS: records accepted by one POST /api/predict_batch.')
@minValue(1)
param maxBatchRecords int = 10000

@description('PTD_MAX_INVOICES_PER_CUSTOMER: invoice rows accepted per customer.')
@minValue(1)
param maxInvoicesPerCustomer int = 2000

@description('PTD_MAX_BODY_BYTES: largest request body accepted (received, and decoded when gzip/deflate); also the Functions host setting FUNCTIONS_REQUEST_BODY_SIZE_LIMIT.')
@minValue(1)
param maxBodyBytes int = 16777216

@description('PTD_MAX_INFLIGHT_BODY_BYTES: request bodies one instance parses and scores at once (at least maxBodyBytes); about 23 bytes of memory per byte at worst (docs/OPERATIONS.md, Memory).')
@minValue(1)
param maxInflightBodyBytes int = 25165824

@description('PTD_MAX_DECOMPRESSED_BYTES: largest output of one gzip batch file; a gzip that inflates beyond it gets error.json. 384 MiB: a Flex Consumption instance has 0.8 GB of temporary storage for the download, the decompressed file and its partitions (about 1.4 times the decompressed size at the peak).')
@minValue(1)
param maxDecompressedBytes int = 402653184

@description('PTD_RATE_LIMIT_PER_MINUTE: requests per caller and minute; 0 turns the limit off.')
@minValue(0)
param rateLimitPerMinute int = 0

@description('PTD_CORS_ORIGINS: comma-separated allowlist of browser origins; empty allows none.')
param corsOrigins string = ''

@description('PTD_LOG_LEVEL: application log level.')
@allowed([
  'DEBUG'
  'INFO'
  'WARNING'
  'ERROR'
])
param logLevel string = 'INFO'

// Who calls (docs/DEPLOYMENT_GUIDE.md, "Entra ID"): built-in authentication with Microsoft Entra ID.
@description('Application (client) id of the API\'s app registration: turns on built-in authentication (tokens required on /api/* but health and the API description). Empty: function keys only.')
param entraApiClientId string = ''

@description('Application (client) ids of the client applications (the utility\'s systems) allowed to call the API, comma-separated.')
param allowedClientApplications string = ''

@description('PTD_REQUIRED_ROLES: app roles the app checks per route (Scores.Read, Models.Read); empty: any allowed client application may call every route.')
param requiredAppRoles string = 'Scores.Read,Models.Read'

@description('PTD_REQUIRE_FUNCTION_KEY: with built-in authentication on, false lets a token alone in; true (default) requires a function key as well.')
param requireFunctionKey bool = true

@description('Tags for every resource.')
param tags object = {}

var token = toLower(uniqueString(subscription().id, resourceGroup().id, appName, environmentName))
var azdTags = empty(azdEnvName) ? {} : { 'azd-env-name': azdEnvName }
var allTags = union(tags, azdTags, {
  application: 'power-theft-detector'
  environment: environmentName
})
// Zone redundancy needs zone-redundant storage: ZRS, or GZRS when geo-redundancy was asked for.
// https://learn.microsoft.com/azure/azure-functions/functions-zone-redundancy
var zoneSku = contains(['Standard_GRS', 'Standard_GZRS'], storageSku) ? 'Standard_GZRS' : 'Standard_ZRS'
var dataStorageSku = zoneRedundant ? zoneSku : storageSku
var hostStorageSku = zoneRedundant ? 'Standard_ZRS' : 'Standard_LRS'
var alertReceivers = concat(empty(alertEmail) ? [] : ['email'], empty(alertWebhookUrl) ? [] : ['webhook'])
// Comma-separated in the parameters file (a GitHub or azd variable), an array for authsettingsV2.
var allowedClientIds = empty(allowedClientApplications) ? [] : split(replace(allowedClientApplications, ' ', ''), ',')
var functionAppName = 'func-${appName}-${environmentName}-${token}'
var modelsContainerName = 'models'
var batchInContainerName = 'batch-in'
var batchOutContainerName = 'batch-out'
var deploymentContainerName = 'app-package'
var deadLetterContainerName = 'eventgrid-deadletter'

module identity 'modules/identity.bicep' = {
  name: 'identity'
  params: {
    location: location
    name: 'id-${appName}-${environmentName}-${token}'
    tags: allTags
  }
}

module storage 'modules/storage.bicep' = {
  name: 'storage'
  params: {
    location: location
    name: take('st${appName}${token}', 24)
    sku: dataStorageSku
    modelsContainerName: modelsContainerName
    batchInContainerName: batchInContainerName
    batchOutContainerName: batchOutContainerName
    deadLetterContainerName: deadLetterContainerName
    batchRetentionDays: batchRetentionDays
    softDeleteRetentionDays: softDeleteRetentionDays
    modelsImmutabilityDays: modelsImmutabilityDays
    vnetEnabled: vnetEnabled
    allowedIpRanges: allowedIpRanges
    lockAccount: lockDataAccount
    workspaceId: monitoring.outputs.workspaceId
    tags: allTags
  }
}

module hostStorage 'modules/host-storage.bicep' = {
  name: 'host-storage'
  params: {
    location: location
    name: take('sth${appName}${token}', 24)
    sku: hostStorageSku
    deploymentContainerName: deploymentContainerName
    principalId: identity.outputs.principalId
    vnetEnabled: vnetEnabled
    allowedIpRanges: allowedIpRanges
    tags: allTags
  }
}

module storageRoles 'modules/storage-roles.bicep' = {
  name: 'storage-roles'
  params: {
    storageAccountName: storage.outputs.name
    modelsContainerName: storage.outputs.modelsContainerName
    trainingContainerName: storage.outputs.trainingContainerName
    batchInContainerName: storage.outputs.batchInContainerName
    batchOutContainerName: storage.outputs.batchOutContainerName
    poisonQueueName: storage.outputs.poisonQueueName
    appPrincipalId: identity.outputs.principalId
    deployerPrincipalId: deployerPrincipalId
    deployerPrincipalType: deployerPrincipalType
  }
}

module network 'modules/network.bicep' = if (vnetEnabled) {
  name: 'network'
  params: {
    location: location
    name: 'vnet-${appName}-${environmentName}-${token}'
    tags: allTags
  }
}

module dataPrivateEndpoints 'modules/private-endpoints.bicep' = if (vnetEnabled) {
  name: 'data-private-endpoints'
  params: {
    location: location
    storageAccountName: storage.outputs.name
    subnetId: network.outputs.privateEndpointSubnetId
    endpoints: [
      {
        service: 'blob'
        dnsZoneId: network.outputs.blobDnsZoneId
      }
      {
        service: 'queue'
        dnsZoneId: network.outputs.queueDnsZoneId
      }
    ]
    tags: allTags
  }
}

module hostPrivateEndpoints 'modules/private-endpoints.bicep' = if (vnetEnabled) {
  name: 'host-private-endpoints'
  params: {
    location: location
    storageAccountName: hostStorage.outputs.name
    subnetId: network.outputs.privateEndpointSubnetId
    endpoints: [
      {
        service: 'blob'
        dnsZoneId: network.outputs.blobDnsZoneId
      }
      {
        service: 'queue'
        dnsZoneId: network.outputs.queueDnsZoneId
      }
      {
        service: 'table'
        dnsZoneId: network.outputs.tableDnsZoneId
      }
    ]
    tags: allTags
  }
}

module monitoring 'modules/monitoring.bicep' = {
  name: 'monitoring'
  params: {
    location: location
    logAnalyticsName: 'log-${appName}-${environmentName}-${token}'
    appInsightsName: 'appi-${appName}-${environmentName}-${token}'
    retentionInDays: logRetentionDays
    publisherPrincipalId: identity.outputs.principalId
    tags: allTags
  }
}

module functionApp 'modules/function-app.bicep' = {
  name: 'function-app'
  params: {
    location: location
    name: functionAppName
    planName: 'asp-${appName}-${environmentName}-${token}'
    identityId: identity.outputs.id
    identityClientId: identity.outputs.clientId
    hostBlobEndpoint: hostStorage.outputs.blobEndpoint
    hostQueueEndpoint: hostStorage.outputs.queueEndpoint
    hostTableEndpoint: hostStorage.outputs.tableEndpoint
    deploymentContainerName: hostStorage.outputs.deploymentContainerName
    dataBlobEndpoint: storage.outputs.blobEndpoint
    dataQueueEndpoint: storage.outputs.queueEndpoint
    appInsightsConnectionString: monitoring.outputs.connectionString
    zoneRedundant: zoneRedundant
    virtualNetworkSubnetId: vnetEnabled ? network.outputs.appSubnetId : ''
    maximumInstanceCount: maximumInstanceCount
    instanceMemoryMB: instanceMemoryMB
    httpPerInstanceConcurrency: httpPerInstanceConcurrency
    alwaysReadyInstances: alwaysReadyInstances
    modelVersion: modelVersion
    modelsContainerName: modelsContainerName
    defaultModel: defaultModel
    batchInContainerName: batchInContainerName
    batchOutContainerName: batchOutContainerName
    maxBatchRecords: maxBatchRecords
    maxInvoicesPerCustomer: maxInvoicesPerCustomer
    maxBodyBytes: maxBodyBytes
    maxDecompressedBytes: maxDecompressedBytes
    maxInflightBodyBytes: maxInflightBodyBytes
    rateLimitPerMinute: rateLimitPerMinute
    corsOrigins: corsOrigins
    logLevel: logLevel
    entraApiClientId: entraApiClientId
    allowedClientApplications: allowedClientIds
    requiredAppRoles: requiredAppRoles
    requireFunctionKey: requireFunctionKey
    tags: allTags
  }
  // The host starts as soon as the app exists: its identity must already hold its roles.
  dependsOn: [
    hostStorage
    storageRoles
    monitoring
    dataPrivateEndpoints
    hostPrivateEndpoints
  ]
}

module eventGrid 'modules/eventgrid.bicep' = {
  name: 'eventgrid'
  params: {
    location: location
    name: 'evgt-${appName}-${environmentName}-${token}'
    storageAccountId: storage.outputs.id
    storageAccountName: storage.outputs.name
    deadLetterContainerName: storage.outputs.deadLetterContainerName
    workspaceId: monitoring.outputs.workspaceId
    tags: allTags
  }
}

module workbook 'modules/workbook.bicep' = {
  name: 'workbook'
  params: {
    location: location
    displayName: 'Power theft detector (${environmentName})'
    appInsightsId: monitoring.outputs.appInsightsId
    tags: allTags
  }
}

module activityLog 'modules/activity-log.bicep' = if (activityLogEnabled) {
  name: 'activity-log-${environmentName}'
  scope: subscription()
  params: {
    name: 'activity-log-to-${appName}-${environmentName}-${token}'
    workspaceId: monitoring.outputs.workspaceId
  }
}

// No action group that notifies nobody: with alertsEnabled the module's `receivers` must not be
// empty (ARM refuses the deployment otherwise); alertsEnabled=false skips alerting explicitly.
module alerts 'modules/alerts.bicep' = if (alertsEnabled) {
  name: 'alerts'
  params: {
    location: location
    namePrefix: '${appName}-${environmentName}'
    appInsightsId: monitoring.outputs.appInsightsId
    systemTopicId: eventGrid.outputs.id
    receivers: alertReceivers
    alertEmail: alertEmail
    alertWebhookUrl: alertWebhookUrl
    http5xxPercentThreshold: http5xxPercentThreshold
    p95LatencyThresholdMs: p95LatencyThresholdMs
    minRequests: alertMinRequests
    tags: allTags
  }
}

// Outputs read by .github/workflows/deploy.yml (tests/test_infra.py checks each one it uses).
output resourceGroup string = resourceGroup().name
output functionAppName string = functionApp.outputs.name
output functionAppUrl string = 'https://${functionApp.outputs.defaultHostName}'
output entraAuthEnabled bool = functionApp.outputs.entraAuthEnabled
output storageAccountName string = storage.outputs.name
output storageBlobEndpoint string = storage.outputs.blobEndpoint
output modelsContainerName string = storage.outputs.modelsContainerName
output trainingContainerName string = storage.outputs.trainingContainerName
output batchInContainerName string = storage.outputs.batchInContainerName
output batchOutContainerName string = storage.outputs.batchOutContainerName
output deadLetterContainerName string = storage.outputs.deadLetterContainerName
output eventGridSystemTopicName string = eventGrid.outputs.name
output actionGroupId string = alertsEnabled ? alerts.outputs.actionGroupId : ''
output hostStorageAccountName string = hostStorage.outputs.name
output identityClientId string = identity.outputs.clientId
output appInsightsName string = monitoring.outputs.appInsightsName
